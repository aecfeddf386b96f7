// The test page's app: what a browser voice agent built on @openai/agents does. The test reads:
//   window.events        every raw server event the SDK's transport received (`transport_event`)
//   window.eventTimes    ms since page start, per event
//   window.errors        page errors, unhandled rejections and the SDK's `error` events (strings)
//   window.state         {phase, callId, timings, history}
//   window.audioLevels   [{t, rms}] of the reply audio (the SDK's <audio> element stream), every 50 ms
import {
  OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession,
} from '../node_modules/@openai/agents-realtime/dist/bundle/openai-realtime-agents.mjs';

const params = new URLSearchParams(location.search);
const SERVER = (params.get('server') || '').replace(/\/+$/, '');
const KEY = params.get('key') || '';
const MODEL = params.get('model') || 'gpt-realtime';
const T0 = performance.now();
const now = () => Math.round(performance.now() - T0);

window.events = [];
window.eventTimes = [];
window.errors = [];
window.audioLevels = [];
window.maxAudioLevel = 0;
window.state = { phase: 'loading', callId: null, timings: {}, history: [] };

const log = (text) => {
  document.getElementById('log').textContent += `${(now() / 1000).toFixed(2)}s ${text}\n`;
};
const phase = (name) => {
  window.state.phase = name;
  window.state.timings[name] = now();
  document.getElementById('phase').textContent = name;
  log(`phase: ${name}`);
};
const describe = (error) => {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  if (error && typeof error === 'object') {
    const inner = error.error ?? error;
    if (inner instanceof Error) return `${inner.name}: ${inner.message}`;
    try {
      return JSON.stringify(inner);
    } catch {
      return String(inner);
    }
  }
  return String(error);
};
const fail = (where, error) => {
  const message = `${where}: ${describe(error)}`;
  window.errors.push(message);
  log(message);
};
window.addEventListener('error', (e) => fail('window.error', e.error ?? e.message));
window.addEventListener('unhandledrejection', (e) => fail('unhandledrejection', e.reason));

// Reply loudness: WebAudio on the stream the SDK attaches to its audio element.
const audioElement = document.getElementById('reply');
let metering = false;
function meter(stream) {
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 2048;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
    const rms = Math.sqrt(sum / buf.length);
    window.audioLevels.push({ t: now(), rms });
    if (rms > window.maxAudioLevel) window.maxAudioLevel = rms;
  }, 50);
  if (ctx.state !== 'running') ctx.resume().catch((e) => fail('AudioContext.resume', e));
}
const waitForTrack = setInterval(() => {
  if (!metering && audioElement.srcObject) {
    metering = true;
    clearInterval(waitForTrack);
    window.state.timings.remoteTrack = now();
    meter(audioElement.srcObject);
  }
}, 20);

const agent = new RealtimeAgent({ name: 'Assistant', instructions: 'Answer in one short sentence.' });
const transport = new OpenAIRealtimeWebRTC({ baseUrl: `${SERVER}/v1/realtime/calls`, audioElement });
const session = new RealtimeSession(agent, {
  transport,
  model: MODEL,
  config: {
    outputModalities: ['audio'],
    audio: {
      input: {
        transcription: { model: 'gpt-4o-mini-transcribe' },
        turnDetection: { type: 'server_vad', silenceDurationMs: 500 },
      },
    },
    providerData: { max_output_tokens: 60 },
  },
});
session.on('transport_event', (event) => {
  window.events.push(event);
  window.eventTimes.push(now());
  if (!(event.type in window.state.timings)) window.state.timings[event.type] = now();
  log(`< ${event.type}`);
});
session.on('error', (error) => fail('session error event', error));
session.on('history_updated', (history) => {
  window.state.history = JSON.parse(JSON.stringify(history));
});

window.hangup = () => session.close();

phase('connecting');
try {
  await session.connect({ apiKey: KEY });
  window.state.callId = transport.callId ?? null;
  phase('connected');
} catch (error) {
  fail('session.connect', error);
  phase('failed');
}
