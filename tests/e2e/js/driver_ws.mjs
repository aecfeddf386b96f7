// The official OpenAI Agents JS SDK (@openai/agents) as a client of an openrealtime server, over
// its WebSocket transport: a RealtimeSession with a RealtimeAgent, pointed at the server by URL.
//
//   node driver_ws.mjs --url ws://127.0.0.1:PORT/v1/realtime?model=gpt-realtime --key sk-...
//                      --scenario text|voice|tool|tool-auto [--wav speech-24k.wav] [--timeout-s 90]
//
// Scenarios: `text` (a typed question, a text answer), `voice` (PCM16 24 kHz speech from --wav
// streamed through session.sendAudio in real time, then silence like an open mic; server VAD ends
// the turn, it is transcribed and answered with audio), `tool` (a typed question with a forced
// function tool; the SDK runs it, sends its output back and the model answers with audio),
// `tool-auto` (the question spoken from --wav like `voice`, a function tool and tool_choice left at
// the server's default "auto": the model decides to call it, the SDK runs it, the answer is spoken).
//
// stdout, one JSON object per line:
//   {"kind":"event", "t", "event", "zod"}   every raw server event the transport received
//                                            (`transport_event`), with the SDK-schema verdict
//   {"kind":"problem", "source", "error"}   an uncaught exception, unhandled rejection or error event
//   {"kind":"summary", ...}                  last: counts, the SDK's own history, tool calls, audio
// Exit status: 0 only if the scenario completed with no problem and no schema failure.

import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { RealtimeAgent, RealtimeSession, tool } from '@openai/agents/realtime';
import { z } from 'zod';

import { SDK_VERSION, checkEvent, describeError } from './lib/sdk_check.mjs';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    key: { type: 'string' },
    scenario: { type: 'string' },
    wav: { type: 'string' },
    question: { type: 'string' },
    'timeout-s': { type: 'string', default: '90' },
  },
});
if (!args.url || !args.key || !['text', 'voice', 'tool', 'tool-auto'].includes(args.scenario)) {
  process.stderr.write('usage: driver_ws.mjs --url WS_URL --key KEY --scenario text|voice|tool|tool-auto [--wav FILE]\n');
  process.exit(64);
}
if ((args.scenario === 'voice' || args.scenario === 'tool-auto') && !args.wav) {
  process.stderr.write(`--scenario ${args.scenario} needs --wav (PCM16 mono 24 kHz)\n`);
  process.exit(64);
}

const started = Date.now();
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const problems = [];
const describe = (error) => {
  if (error instanceof Error) return { ...describeError(error), stack: error.stack };
  try {
    return JSON.parse(JSON.stringify(error ?? null));
  } catch {
    return String(error);
  }
};
const problem = (source, error) => {
  const entry = { source, t: Date.now() - started, error: describe(error) };
  problems.push(entry);
  out({ kind: 'problem', ...entry });
};
process.on('uncaughtException', (error) => problem('uncaughtException', error));
process.on('unhandledRejection', (reason) => problem('unhandledRejection', reason));

// ---- scenario set-up ---------------------------------------------------------------------------

const QUESTIONS = {
  text: 'What is the capital of France?',
  tool: "What's the weather in Paris?",
};
const toolCalls = [];
let session;

const getWeather = tool({
  name: 'get_weather',
  description: 'Get the current weather for a city.',
  parameters: z.object({ city: z.string().describe('The city, e.g. Paris') }),
  async execute({ city }) {
    toolCalls.push({ city, t: Date.now() - started });
    // The session forces the first call (tool_choice "required", so that even a tiny model calls
    // it); the answer after the tool's output must be free to be speech, not another call.
    session.transport.sendEvent({ type: 'session.update', session: { type: 'realtime', tool_choice: 'auto' } });
    return `The weather in ${city} is sunny and 23 degrees.`;
  },
});

// tool-auto: nothing forces the call and nothing changes the session; the result is distinctive.
const getWeatherAuto = tool({
  name: 'get_weather',
  description: 'Get the current weather for a city.',
  parameters: z.object({ city: z.string().describe('The city, e.g. Paris') }),
  async execute({ city }) {
    toolCalls.push({ city, t: Date.now() - started });
    return `It is 23 degrees and sunny in ${city}.`;
  },
});

const agent = new RealtimeAgent({
  name: 'Assistant',
  instructions: args.scenario === 'tool'
    ? 'You are a weather assistant. Use the get_weather tool, then say the weather in one short sentence.'
    : 'Answer in one short sentence.',
  tools: args.scenario === 'tool' ? [getWeather] : [],
  ...(args.scenario === 'tool-auto' ? {
    instructions: 'You are a weather assistant. Answer in one short sentence.',
    tools: [getWeatherAuto],
  } : {}),
});

const config = {
  outputModalities: args.scenario === 'text' ? ['text'] : ['audio'],
  audio: {
    input: {
      format: { type: 'audio/pcm', rate: 24000 },
      transcription: { model: 'gpt-4o-mini-transcribe' },
      turnDetection: { type: 'server_vad', silenceDurationMs: 500 },
    },
    output: { format: { type: 'audio/pcm', rate: 24000 } },
  },
  ...(args.scenario === 'tool' ? { toolChoice: 'required' } : {}),
  providerData: { max_output_tokens: 60 },
};

session = new RealtimeSession(agent, { transport: 'websocket', model: 'gpt-realtime', config });

// ---- observation -------------------------------------------------------------------------------

const events = [];
const zodFailures = [];
const genericTypes = new Set();
const audioBytes = {}; // responseId -> PCM bytes the SDK decoded and emitted as `audio`
const sdkEvents = [];
let onEvent = () => {};

session.on('transport_event', (event) => {
  const verdict = checkEvent(event);
  if (!verdict.typed) genericTypes.add(verdict.type);
  if (!verdict.ok) zodFailures.push({ type: verdict.type, event_id: event?.event_id, errors: verdict.errors });
  events.push(event);
  out({ kind: 'event', t: Date.now() - started, event, zod: verdict });
  try {
    onEvent(event);
  } catch (error) {
    problem('driver', error);
  }
});
session.on('error', (error) => problem('session error event', error?.error ?? error));
session.on('audio', (event) => {
  audioBytes[event.responseId] = (audioBytes[event.responseId] ?? 0) + event.data.byteLength;
});
session.on('agent_tool_start', (_ctx, _agent, usedTool, details) => {
  sdkEvents.push({ type: 'agent_tool_start', tool: usedTool.name, arguments: details?.toolCall?.arguments });
});
session.on('agent_tool_end', (_ctx, _agent, usedTool, result) => {
  sdkEvents.push({ type: 'agent_tool_end', tool: usedTool.name, result });
});
session.on('agent_end', (_ctx, _agent, text) => sdkEvents.push({ type: 'agent_end', text }));

const seen = (type, predicate = () => true) => events.some((e) => e.type === type && predicate(e));
// A response that failed or was cancelled: nothing the scenario waits for will follow it.
const responseFailed = () => seen('response.done', (e) => ['failed', 'cancelled'].includes(e.response?.status));
const count = (type) => events.filter((e) => e.type === type).length;

/** Resolves when `condition()` holds after some event, or after `timeoutMs` (then false). */
function waitFor(condition, timeoutMs) {
  return new Promise((resolve) => {
    if (condition()) {
      resolve(true);
      return;
    }
    const timer = setTimeout(() => {
      onEvent = () => {};
      resolve(false);
    }, timeoutMs);
    onEvent = () => {
      if (condition()) {
        clearTimeout(timer);
        onEvent = () => {};
        resolve(true);
      }
    };
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- audio ---------------------------------------------------------------------------------------

/** PCM16 samples of a WAV file; it must be mono 16-bit 24 kHz, what the session's input format says. */
function readWav(path) {
  const buf = readFileSync(path);
  if (buf.toString('ascii', 0, 4) !== 'RIFF' || buf.toString('ascii', 8, 12) !== 'WAVE') {
    throw new Error(`${path}: not a RIFF/WAVE file`);
  }
  let fmt = null;
  for (let offset = 12; offset + 8 <= buf.length;) {
    const id = buf.toString('ascii', offset, offset + 4);
    const size = buf.readUInt32LE(offset + 4);
    const body = offset + 8;
    if (id === 'fmt ') {
      fmt = { format: buf.readUInt16LE(body), channels: buf.readUInt16LE(body + 2),
        rate: buf.readUInt32LE(body + 4), bits: buf.readUInt16LE(body + 14) };
    } else if (id === 'data') {
      if (!fmt || fmt.format !== 1 || fmt.channels !== 1 || fmt.bits !== 16 || fmt.rate !== 24000) {
        throw new Error(`${path}: need PCM16 mono 24000 Hz, got ${JSON.stringify(fmt)}`);
      }
      return buf.subarray(body, body + size);
    }
    offset = body + size + (size % 2);
  }
  throw new Error(`${path}: no data chunk`);
}

const CHUNK_MS = 40;
const CHUNK_BYTES = (24000 * 2 * CHUNK_MS) / 1000;

/** Streams `pcm` in 40 ms chunks at real-time pace, then silence until `stop()` says so. */
async function streamLikeAMic(pcm, stop) {
  const silence = new ArrayBuffer(CHUNK_BYTES);
  const t0 = Date.now();
  for (let i = 0; ; i++) {
    if (stop()) return;
    const offset = i * CHUNK_BYTES;
    if (offset < pcm.length) {
      const chunk = pcm.subarray(offset, Math.min(pcm.length, offset + CHUNK_BYTES));
      session.sendAudio(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength));
    } else {
      session.sendAudio(silence);
    }
    const due = t0 + (i + 1) * CHUNK_MS;
    await sleep(Math.max(0, due - Date.now()));
  }
}

// ---- run -----------------------------------------------------------------------------------------

const timeoutMs = Number(args['timeout-s']) * 1000;
let completed = false;
let finished = false;

async function run() {
  await session.connect({ apiKey: args.key, url: args.url });
  if (!(await waitFor(() => seen('session.updated'), 15000))) {
    throw new Error('no session.updated after connect');
  }

  if (args.scenario === 'text') {
    session.sendMessage(args.question ?? QUESTIONS.text);
    completed = await waitFor(() => seen('response.done'), timeoutMs) && !responseFailed();
  } else if (args.scenario === 'voice') {
    const pcm = readWav(args.wav);
    const voiceDone = () => seen('conversation.item.input_audio_transcription.completed')
      && seen('response.done');
    let micOff = false;
    const mic = streamLikeAMic(pcm, () => micOff || finished || voiceDone());
    completed = await waitFor(() => voiceDone() || responseFailed(), timeoutMs) && !responseFailed();
    micOff = true;
    await mic;
    // The SDK asks for the transcribed item (conversation.item.retrieve) to update its history.
    if (completed) await waitFor(() => seen('conversation.item.retrieved'), 5000);
  } else if (args.scenario === 'tool-auto') {
    const pcm = readWav(args.wav);
    const outputAdded = () => events.findIndex((e) => e.type === 'conversation.item.added'
      && e.item?.type === 'function_call_output');
    // The answer to the function_call_output, or a response with no call (then nothing follows).
    const answered = () => {
      const index = outputAdded();
      if (index >= 0) return events.slice(index).some((e) => e.type === 'response.done');
      return seen('response.done', (e) => !(e.response?.output ?? []).some((o) => o.type === 'function_call'));
    };
    let micOff = false;
    const mic = streamLikeAMic(pcm, () => micOff || finished || answered());
    completed = await waitFor(() => answered() || count('response.done') >= 4 || responseFailed(), timeoutMs)
      && !responseFailed();
    micOff = true;
    await mic;
  } else {
    session.sendMessage(args.question ?? QUESTIONS.tool);
    // The forced call, the SDK's function_call_output, then the answer to it.
    const outputAdded = () => events.findIndex((e) => e.type === 'conversation.item.added'
      && e.item?.type === 'function_call_output');
    completed = await waitFor(() => {
      const index = outputAdded();
      return (index >= 0 && events.slice(index).some((e) => e.type === 'response.done'))
        || count('response.done') >= 4 || responseFailed();
    }, timeoutMs) && !responseFailed();
  }
  await sleep(300); // trailing events (output_audio_buffer.*, conversation.item.done, ...)
}

let runError = null;
try {
  // Whatever happens inside (a stuck await after a crash in the SDK), end with a summary.
  let deadline;
  await Promise.race([
    run().finally(() => clearTimeout(deadline)),
    new Promise((_resolve, reject) => {
      deadline = setTimeout(() => reject(new Error('driver deadline passed')), timeoutMs + 30000);
    }),
  ]);
} catch (error) {
  runError = error;
  problem('run', error);
} finally {
  finished = true;
  try {
    session.close();
  } catch (error) {
    problem('close', error);
  }
}
await sleep(100);

const summary = {
  kind: 'summary',
  scenario: args.scenario,
  sdk: { package: '@openai/agents', version: SDK_VERSION, transport: 'OpenAIRealtimeWebSocket' },
  completed: completed && !runError,
  elapsed_ms: Date.now() - started,
  event_count: events.length,
  event_types: Object.fromEntries([...new Set(events.map((e) => e.type))].map((t) => [t, count(t)])),
  zod_failures: zodFailures,
  generic_types: [...genericTypes].sort(),
  problems,
  audio_bytes_by_response: audioBytes,
  tool_calls: toolCalls,
  sdk_events: sdkEvents,
  history: session.history,
};
out(summary);
process.exitCode = summary.completed && problems.length === 0 && zodFailures.length === 0 ? 0 : 1;
// Do not hang on a handle the SDK left open after a failure.
setTimeout(() => process.exit(), 2000).unref();
