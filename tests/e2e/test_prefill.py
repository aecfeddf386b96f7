"""Speculative prompt evaluation during the silence wait (engine/prefill.py), through the real server.

Audio is streamed in real time here: the prefill runs on the wall clock while the turn detector
counts audio time, so a faster-than-real-time stream would confirm the turn before it could help.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from openrealtime.backends.gguf import ensure_model
from openrealtime.backends.llamacpp import LlamaCppBackend
from openrealtime.backends.llm import ChatMessage, Finished, GenerationParams
from tests.audio_fixtures import silence, speak
from tests.metrics_text import total

from .conftest import Server, client, start_server, stop_server
from .test_metrics import scrape
from .test_voice_websocket import RATE, Recorder, send_audio

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server with the prompt-only prefill on for every turn (`llm_prefill`; the default "auto" is
    server_vad only; `llm_speculate` off: the response makes its own request and finds it cached)."""
    srv = start_server({"OPENREALTIME_LLM_PREFILL": "true", "OPENREALTIME_LLM_SPECULATE": "false"}, name="prefill")
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text()


def voice_session(silence_ms: int) -> dict:
    return {
        "type": "realtime",
        "output_modalities": ["text"],
        "instructions": "You are a helpful assistant. Answer in one short sentence.",
        "max_output_tokens": 24,
        "audio": {"input": {"transcription": {"model": "whisper-1"},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}},
    }


async def ask(server: Server, audio: bytes, linger_s: float = 0.0) -> tuple[Recorder, dict]:
    """One spoken turn in real time (the silence wait is 1.5 s); the recorder and the response."""
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        rec = Recorder(conn)
        await rec.wait_for("session.created")
        await conn.session.update(session=voice_session(1500))  # type: ignore[arg-type]
        await rec.wait_for("session.updated")
        await send_audio(conn, audio, speedup=1.0)
        done = (await rec.wait_for("response.done"))["response"]
        await asyncio.sleep(linger_s)
        rec.task.cancel()
    return rec, done


async def test_with_the_setting_off_nothing_is_prefilled_and_by_default_a_server_vad_turn_is() -> None:
    question = silence(400, RATE) + speak("What is the capital of France?", RATE) + silence(2500, RATE)
    srv = start_server({"OPENREALTIME_LLM_PREFILL": "false"}, name="no-prefill")
    try:
        usage = (await ask(srv, question))[1]["usage"]
    finally:
        stop_server(srv)
    # Only a shared prefix (the chat template's start) can come from the cache: not the question.
    assert usage["input_token_details"]["cached_tokens"] < usage["input_tokens"] - 8, usage
    # llm_prefill "auto": server_vad turns are prefilled
    srv = start_server({"OPENREALTIME_LLM_SPECULATE": "false"}, name="auto-prefill")
    try:
        usage = (await ask(srv, question))[1]["usage"]
    finally:
        stop_server(srv)
    assert usage["input_token_details"]["cached_tokens"] >= usage["input_tokens"] - 1, usage


def opened(after: dict, before: dict) -> float:
    """Open prefills (while the user spoke: the prompt up to the words so far) between two scrapes."""
    return total(after, "openrealtime_speculative_llm_requests_total", kind="open") - \
        total(before, "openrealtime_speculative_llm_requests_total", kind="open")


def turn_timing(server: Server, response_id: str) -> dict:
    """The server's turn-timing line for a response (engine/session.py)."""
    for line in server.log_text().splitlines():
        if "turn-timing " in line:
            data = json.loads(line.split("turn-timing ", 1)[1])
            if data["response"] == response_id:
                return data["ms"]
    raise AssertionError(f"no turn-timing line for {response_id}")


@pytest.fixture(scope="module")
def default_server() -> Iterator[Server]:
    """The defaults: server_vad turns are prefilled and the reply is generated speculatively."""
    srv = start_server(name="speculate")
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text()


async def test_by_default_the_response_adopts_the_speculative_generation(default_server: Server):
    """The reply was already being written during the silence wait: the response takes it over
    (one LLM request for the turn) instead of asking again."""
    requests = "openrealtime_llm_queue_wait_seconds_count"
    before = await scrape(default_server)
    rec, done = await ask(default_server, silence(400, RATE) + speak("What is the capital of France?", RATE)
                          + silence(2500, RATE), linger_s=0.5)
    assert done["status"] in ("completed", "incomplete"), done
    assert done["usage"]["output_tokens"] > 0
    text = "".join(e["delta"] for e in rec.events if e["type"] == "response.output_text.delta")
    assert text.strip() and text == done["output"][0]["content"][0]["text"], (text, done["output"])
    assert turn_timing(default_server, done["id"])["speculative_llm"] == 1.0
    types = rec.types()
    assert types.count("response.created") == 1 and types.count("response.done") == 1, types
    # The speculation (the response's own stream) and nothing else, unless a pause inside the
    # question started one more that was thrown away; besides the open prefills while it was spoken.
    after = await scrape(default_server)
    assert opened(after, before) >= 1  # at least the one at the start of speech
    assert 1 <= total(after, requests) - total(before, requests) - opened(after, before) <= 2


@pytest.fixture(scope="module")
async def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaCppBackend]:
    """The servers' model (SmolLM2-135M) in this process, to count the tokens of their prompts."""
    path = ensure_model("smollm2-135m", tmp_path_factory.mktemp("models"), progress=False)
    llm = await asyncio.to_thread(LlamaCppBackend, path, n_ctx=1024, n_threads=1, check_batching=False)
    yield llm
    await llm.close()


async def test_from_the_start_of_speech_the_prompt_is_evaluated_up_to_the_words(
        default_server: Server, tokenizer: LlamaCppBackend):
    """semantic_vad (no prefill at its pauses by default): as the user starts speaking, the prompt
    up to their message's first word is evaluated (the end of the reply before, the user's header),
    then the words so far (partial transcripts): at the end of the turn only the last words and the
    template's end of turn are left."""
    instructions = "You are a helpful assistant. Answer in one short sentence."
    config = {**voice_session(500), "instructions": instructions,
              "audio": {"input": {"transcription": {"model": "whisper-1"},
                                  "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}
    turns: list[tuple[str, dict]] = []
    async with client(default_server).realtime.connect(model="gpt-realtime") as conn:
        rec = Recorder(conn)
        await rec.wait_for("session.created")
        await conn.session.update(session=config)  # type: ignore[arg-type]
        await rec.wait_for("session.updated")
        for question in ("What is the capital of France?",
                         "Now tell me the name of the capital city of Italy."):  # no comma: no pause
            mark = len(rec.events)
            await send_audio(conn, silence(400, RATE) + speak(question, RATE) + silence(2500, RATE), speedup=1.0)
            done = (await rec.wait_for("response.done", after=mark))["response"]
            said = await rec.wait_for("conversation.item.input_audio_transcription.completed", after=mark)
            turns.append((said["transcript"], done))
        rec.task.cancel()
    (said1, done1), (said2, done2) = turns
    assert done2["status"] in ("completed", "incomplete"), done2
    history = [ChatMessage("system", instructions), ChatMessage("user", said1),
               ChatMessage("assistant", done1["output"][0]["content"][0]["text"])]
    full = await tokenizer.count_tokens([*history, ChatMessage("user", said2)])
    assert done2["usage"]["input_tokens"] == full  # the server's prompt, rebuilt here exactly
    opened = [e async for e in tokenizer.stream([*history, ChatMessage("user", "")],
                                                GenerationParams(max_tokens=0, open_last=True))]
    assert isinstance(opened[-1], Finished)
    header = opened[-1].usage.prompt_tokens
    tail = full - (await tokenizer.count_tokens([*history, ChatMessage("user", said2[:-1])]))  # the end of turn
    cached = done2["usage"]["input_token_details"]["cached_tokens"]
    # More than the header (words were read while the user spoke), never the end of the turn.
    assert header + 2 <= cached <= full - tail, (cached, header, full, tail, said2)


async def test_speaking_on_discards_the_speculative_reply(default_server: Server):
    """A pause long enough for a speculative reply, then more words: the reply written at the pause
    is thrown away; the one response answers the whole utterance (adopted from the speculation
    at the real end of the turn), and nothing of the first is sent."""
    first, second = speak("Please tell me the name of", RATE), speak("the capital city of France.", RATE)
    requests = "openrealtime_llm_queue_wait_seconds_count"
    for _attempt in range(3):
        before = await scrape(default_server)
        rec, done = await ask(default_server, silence(400, RATE) + first + silence(1000, RATE) + second
                              + silence(2500, RATE), linger_s=0.5)
        types = rec.types()
        assert types.count("input_audio_buffer.committed") == 1, types
        assert types.count("response.created") == 1 and types.count("response.done") == 1, types
        [completed] = [e for e in rec.events if e["type"] == "conversation.item.input_audio_transcription.completed"]
        words = completed["transcript"].lower()
        assert "name" in words and "france" in words, words
        assert done["status"] in ("completed", "incomplete"), done
        deltas = [e for e in rec.events if e["type"] == "response.output_text.delta"]
        assert deltas and {e["response_id"] for e in deltas} == {done["id"]}, deltas
        assert "".join(e["delta"] for e in deltas) == done["output"][0]["content"][0]["text"]
        # Two speculations (besides the open prefills while the user spoke): the one at the pause
        # (discarded) and the one the response adopted.
        after = await scrape(default_server)
        if total(after, requests) - total(before, requests) - opened(after, before) >= 2 \
                and turn_timing(default_server, done["id"])["speculative_llm"] == 1.0:
            break
    else:
        raise AssertionError("no speculation at the pause in three attempts")


async def test_the_prompt_is_evaluated_while_the_silence_wait_runs(server: Server):
    """A long silence wait: the speculative transcript and the prefill are done before the turn is
    confirmed, so the response finds its whole prompt but the last token in the cache."""
    rec, done = await ask(server, silence(400, RATE) + speak("What is the capital of France?", RATE)
                          + silence(2500, RATE))
    assert done["status"] in ("completed", "incomplete"), done
    usage = done["usage"]
    assert usage["output_tokens"] > 0
    assert usage["input_token_details"]["cached_tokens"] >= usage["input_tokens"] - 1, usage
    assert sum(t == "response.created" for t in rec.types()) == 1


async def test_speaking_on_after_a_pause_discards_the_speculation(server: Server):
    """A pause long enough for the speculative transcript and prefill (1 s, the wait is 1.5 s), then
    more words: one turn, one response, and it is about the whole utterance.

    The prefill at the pause needs Whisper done within ~0.8 s of the pause's start; a loaded machine
    can miss that (one CI run of many), and then there is no speculation to discard. So the turn is
    asked again, at most twice, until the prefill did happen; every attempt must pass every check."""
    first, second = speak("Please tell me the name of", RATE), speak("the capital city of France.", RATE)
    requests = "openrealtime_llm_queue_wait_seconds_count"
    for _attempt in range(3):
        before = await scrape(server)
        rec, done = await ask(server, silence(400, RATE) + first + silence(1000, RATE) + second
                              + silence(2500, RATE), linger_s=0.5)  # nothing else may follow
        types = rec.types()
        assert types.count("input_audio_buffer.committed") == 1, types
        assert types.count("response.created") == 1 and types.count("response.done") == 1, types
        completed = [e for e in rec.events if e["type"] == "conversation.item.input_audio_transcription.completed"]
        assert len(completed) == 1
        words = completed[0]["transcript"].lower()
        assert "name" in words and "france" in words, words  # the full utterance, not the speculation
        assert done["status"] in ("completed", "incomplete"), done
        # Three LLM requests besides the open prefills while the user spoke: the prefill at the
        # pause (thrown away), the one at the end, the response.
        after = await scrape(server)
        if total(after, requests) - total(before, requests) - opened(after, before) >= 3:
            break
    else:
        raise AssertionError("no prefill at the pause in three attempts")
