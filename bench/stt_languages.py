"""Word error rate and time per utterance of the offline Whisper models, per language.

The same espeak-ng sentences (English, Spanish, German; French with --french) go through
Whisper tiny.en (the English-only default) and the multilingual Whisper base, through the
server's own backend (``WhisperSTT``: int8, beam 1, one thread). Base runs twice per language:
with the language given (``audio.input.transcription.language``) and with automatic detection
(no language), which also reports how often the language was detected right. tiny.en only
transcribes English. Prints one table; writes bench/results/stt_languages.json.

    .venv/bin/python bench/stt_languages.py            # needs espeak-ng and whisper-base installed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrealtime.backends.speech import TranscriptDone  # noqa: E402
from openrealtime.backends.whisper_models import ensure_stt_model  # noqa: E402
from openrealtime.backends.whisper_stt import WhisperSTT  # noqa: E402
from openrealtime.config import load_settings  # noqa: E402
from tests.audio_fixtures import espeak  # noqa: E402
from tests.noise_fixtures import edit_distance  # noqa: E402

SENTENCES: dict[str, tuple[str, list[str]]] = {
    "en": ("en-us", [
        "The dog runs through the park every day.",
        "Please book a table for two at seven tonight.",
        "What is the weather going to be like tomorrow?",
        "My train leaves from platform four at noon.",
        "Can you remind me to call my sister later?",
        "The library closes early on Sunday afternoons.",
        "I would like a cup of coffee with milk.",
        "Turn off the lights in the kitchen, please.",
        "How far is the airport from the city centre?",
        "We are meeting the new team on Monday morning.",
    ]),
    "es": ("es", [
        "El perro corre por el parque todos los días.",
        "Por favor, reserva una mesa para dos esta noche.",
        "¿Qué tiempo va a hacer mañana por la mañana?",
        "Mi tren sale del andén cuatro a mediodía.",
        "¿Puedes recordarme que llame a mi hermana más tarde?",
        "La biblioteca cierra temprano los domingos.",
        "Quisiera un café con leche, por favor.",
        "Apaga las luces de la cocina, por favor.",
        "¿Qué distancia hay del aeropuerto al centro?",
        "Nos reunimos con el nuevo equipo el lunes.",
    ]),
    "de": ("de", [
        "Der Hund läuft jeden Tag durch den Park.",
        "Bitte reserviere einen Tisch für zwei Personen heute Abend.",
        "Wie wird das Wetter morgen früh?",
        "Mein Zug fährt um zwölf Uhr von Gleis vier ab.",
        "Kannst du mich später an meine Schwester erinnern?",
        "Die Bibliothek schließt am Sonntag früher.",
        "Ich hätte gern einen Kaffee mit Milch.",
        "Mach bitte das Licht in der Küche aus.",
        "Wie weit ist der Flughafen vom Stadtzentrum entfernt?",
        "Wir treffen das neue Team am Montagmorgen.",
    ]),
}
FRENCH = ("fr", [
    "Le chien court dans le parc tous les jours.",
    "Je voudrais un café au lait, s'il vous plaît.",
    "Quel temps fera-t-il demain matin?",
    "Mon train part du quai quatre à midi.",
    "La bibliothèque ferme tôt le dimanche.",
])


def words(text: str) -> list[str]:
    """Lower-cased words of any script, punctuation and accents dropped ("¿Qué" matches "que"):
    espeak-ng's stress is not a reliable cue for the accent a writer would put."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return re.findall(r"\w+", plain.casefold())


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate: total word edits over total reference words."""
    errors = sum(edit_distance(words(r), words(h)) for r, h in zip(references, hypotheses, strict=True))
    return errors / max(sum(len(words(r)) for r in references), 1)


async def transcribe(stt: WhisperSTT, pcm16k: bytes, language: str | None) -> tuple[TranscriptDone, float]:
    t0 = time.perf_counter()
    done = None
    async for event in stt.transcribe(pcm16k, language=language):
        if isinstance(event, TranscriptDone):
            done = event
    assert done is not None
    return done, time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    sets = dict(SENTENCES)
    if args.french:
        sets["fr"] = FRENCH
    audio = {lang: [espeak(s, voice, 16000) for s in sentences] for lang, (voice, sentences) in sets.items()}
    models = {"whisper-tiny.en": WhisperSTT(),
              "whisper-base": WhisperSTT(ensure_stt_model("whisper-base", settings.model_cache_dir),
                                         name="whisper-base")}
    rows: list[dict[str, Any]] = []
    for name, stt in models.items():
        await stt.warmup()
        for lang, (_, sentences) in sets.items():
            modes = [lang] if name.endswith(".en") else [lang, None]
            if name.endswith(".en") and lang != "en":
                continue
            for given in modes:
                hyps, times, detected = [], [], []
                for pcm in audio[lang]:
                    done, dt = await transcribe(stt, pcm, given)
                    hyps.append(done.text)
                    times.append(dt)
                    detected.append(done.language)
                durations = [len(p) / 32000 for p in audio[lang]]
                rows.append({
                    "model": name, "language": lang, "mode": "given" if given else "auto",
                    "utterances": len(sentences), "wer": round(wer(sentences, hyps), 3),
                    "median_s": round(statistics.median(times), 3),
                    "median_audio_s": round(statistics.median(durations), 2),
                    "rtf": round(sum(times) / sum(durations), 3),
                    "detected_right": sum(d == lang for d in detected) if given is None else None,
                    "hypotheses": hyps, "detected": detected,
                })
        await stt.close()
    return {"rows": rows, "sentences": {k: v[1] for k, v in sets.items()},
            "settings": {"compute_type": "int8", "beam_size": 1, "cpu_threads": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--french", action="store_true", help="add five French sentences")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stt_languages.json"))
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"{'model':16} {'lang':4} {'language':9} {'n':>3} {'WER':>6} {'median s':>9} {'audio s':>8} "
          f"{'RTF':>6} {'detected':>9}")
    for r in result["rows"]:
        det = "" if r["detected_right"] is None else f"{r['detected_right']}/{r['utterances']}"
        print(f"{r['model']:16} {r['language']:4} {r['mode']:9} {r['utterances']:>3} {r['wer']:>6.1%} "
              f"{r['median_s']:>9.2f} {r['median_audio_s']:>8.2f} {r['rtf']:>6.2f} {det:>9}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
