// openrealtime playground: a WebRTC client of the Realtime API, in plain browser JavaScript.
//
// Flow: a key (an ephemeral ek_ from POST /playground/session, or one the user pastes) ->
// getUserMedia -> RTCPeerConnection with the mic track and the "oai-events" data channel ->
// the SDP offer and the session settings POSTed to /v1/realtime/calls (multipart: sdp + session) ->
// the SDP answer. Events arrive on the data channel; the reply plays from the remote audio track.
//
// For tests and the curious, `window.playground` exposes the state, every event, and the actions.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const now = () => performance.now();
  const SETTINGS_KEY = "openrealtime.playground.settings";  // non-secret settings only; keys are never stored
  const OUT_AUDIBLE_RMS = 0.01;  // reply audio above this counts as heard
  const MIC_MIN_SPEECH_RMS = 0.015;
  const SAMPLE_MS = 20;
  const MAX_EVENTS = 5000;
  const MAX_EVENT_NODES = 1500;
  const CONNECT_TIMEOUT_MS = 25000;

  const state = {
    phase: "idle",  // idle | connecting | connected | failed | closed
    status: "Not connected",
    callId: null,
    keyKind: null,
    keyExpiresAt: null,
    micError: null,
    micOpen: false,
    remoteTrack: false,
    audioArrived: false,
    maxOutputLevel: 0,
    maxMicLevel: 0,
    latencies: [],  // {ms, method, at}
    errors: [],
    session: null,  // the last session.created / session.updated
    responseActive: false,
  };
  const events = [];  // {dir: "client"|"server"|"http", t, type, data}

  let serverConfig = null;
  let pc = null;
  let dc = null;
  let mic = null;
  let audioCtx = null;
  let key = null;
  let connectSeq = 0;
  let connectStartedAt = 0;
  let connectTimer = null;
  let samplers = [];
  const seenTypes = new Set();

  // ------------------------------------------------------------------ UI helpers

  class UserError extends Error {}

  function setPhase(phase, text) {
    state.phase = phase;
    state.status = text;
    $("status").dataset.phase = phase;
    $("status-text").textContent = text;
    const busy = phase === "connecting" || phase === "connected";
    $("connect").hidden = busy;
    $("disconnect").hidden = !busy;
    $("reconnect").hidden = !(phase === "failed" || phase === "closed" || phase === "connected");
  }

  function banner(message, level = "error") {
    if (level === "error") state.errors.push(message);
    $("banner").dataset.level = level;
    $("banner-text").textContent = message;
    $("banner").hidden = false;
  }
  function clearBanner() { $("banner").hidden = true; }

  function fail(err) {
    const message = err instanceof UserError ? err.message : `Something went wrong: ${err && err.message ? err.message : err}`;
    if (!(err instanceof UserError)) console.error(err);
    teardown();
    setPhase("failed", "Not connected");
    banner(message, "error");
  }

  const UNREACHABLE = () => `Cannot reach the server at ${location.origin}. Is it still running? `
    + "Start it (make serve), then press Reconnect.";

  function errorText(body) {
    if (body && typeof body === "object" && body.error) {
      const e = body.error;
      return `${e.message || e.code || "error"}${e.param ? ` (${e.param})` : ""}`;
    }
    return typeof body === "string" ? body.slice(0, 300) : "";
  }

  function httpFailure(what, status, body) {
    const detail = errorText(body);
    const code = body && body.error ? body.error.code : null;
    const pasted = keySource() === "own";
    if (status === 401) {
      if (code === "expired_api_key") return new UserError(`The key has expired: ${detail} Press Reconnect for a fresh one.`);
      return new UserError(`The key was rejected (401): ${detail}` + (pasted
        ? " Check the key you pasted." : ""));
    }
    if (status === 403) return new UserError(`${what} was refused (403): ${detail}`);
    if (status === 429) return new UserError(`The server is busy (429): ${detail}`);
    if (status >= 500) return new UserError(`The server failed (${status}) on ${what}: ${detail}`);
    return new UserError(`${what} failed (${status}): ${detail}`);
  }

  async function readBody(response) {
    const text = await response.text();
    try { return JSON.parse(text); } catch { return text; }
  }

  async function http(method, path, { headers = {}, body } = {}) {
    let response;
    try {
      response = await fetch(path, { method, headers, body, cache: "no-store" });
    } catch (err) {
      logEvent("http", { type: `${method} ${path}`, error: String(err) });
      throw new UserError(UNREACHABLE());
    }
    logEvent("http", { type: `${method} ${path.split("?")[0]} → ${response.status}`, status: response.status });
    return response;
  }

  function keySource() {
    const checked = document.querySelector("input[name=keysrc]:checked");
    return checked ? checked.value : "server";
  }

  // ------------------------------------------------------------------ settings

  const FIELDS = ["model", "voice", "modality", "max-tokens", "vad", "vad-threshold", "vad-silence", "vad-prefix", "vad-idle",
                  "vad-eagerness", "vad-create", "vad-interrupt", "transcribe", "instructions"];

  function saveSettings() {
    const out = {};
    for (const id of FIELDS) {
      const el = $(id);
      out[id] = el.type === "checkbox" ? el.checked : el.value;
    }
    try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(out)); } catch { /* private mode */ }
  }

  function loadSettings() {
    let saved = null;
    try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null"); } catch { saved = null; }
    if (!saved) return;
    for (const id of FIELDS) {
      const el = $(id);
      if (!(id in saved) || !el) continue;
      if (el.type === "checkbox") el.checked = !!saved[id];
      else if (el.tagName === "SELECT") {
        if ([...el.options].some((o) => o.value === saved[id])) el.value = saved[id];
        else el.dataset.wanted = saved[id];  // options may arrive later (voices, models)
      } else el.value = saved[id];
    }
  }

  function showVadParams() {
    const vad = $("vad").value;
    $("server-vad-params").hidden = vad !== "server_vad";
    $("semantic-vad-params").hidden = vad !== "semantic_vad";
    $("vad-create").parentElement.hidden = vad === "none";
    $("vad-interrupt").parentElement.hidden = vad === "none";
    $("commit").hidden = vad !== "none";
  }

  function numberField(id, { min, max, integer, optional }) {
    const raw = $(id).value.trim();
    if (raw === "" && optional) return undefined;
    const value = Number(raw);
    if (raw === "" || !Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
      const name = { "vad-threshold": "threshold", "vad-silence": "silence_duration_ms", "vad-prefix": "prefix_padding_ms",
        "vad-idle": "idle_timeout_ms", "max-tokens": "Max output tokens" }[id] || id;
      throw new UserError(`${name}: enter ${integer ? "a whole number" : "a number"} from ${min} to ${max}`
        + `${optional ? " (or leave it empty)" : ""}.`);
    }
    return value;
  }

  // The session object sent in the offer and in session.update (the GA Realtime shape).
  function buildSession() {
    const session = { type: "realtime", output_modalities: [$("modality").value] };
    const instructions = $("instructions").value.trim();
    if (instructions) session.instructions = instructions;
    if ($("model").value) session.model = $("model").value;
    const maxTokens = numberField("max-tokens", { min: 1, max: 4096, integer: true, optional: true });
    session.max_output_tokens = maxTokens === undefined ? "inf" : maxTokens;
    const input = { transcription: $("transcribe").checked ? { model: "whisper-1" } : null };
    const vad = $("vad").value;
    if (vad === "none") input.turn_detection = null;
    else if (vad === "server_vad") {
      input.turn_detection = {
        type: "server_vad",
        threshold: numberField("vad-threshold", { min: 0, max: 1 }),
        silence_duration_ms: numberField("vad-silence", { min: 0, max: 10000, integer: true }),
        prefix_padding_ms: numberField("vad-prefix", { min: 0, max: 10000, integer: true }),
        create_response: $("vad-create").checked,
        interrupt_response: $("vad-interrupt").checked,
      };
      const idle = numberField("vad-idle", { min: 5000, max: 30000, integer: true, optional: true });
      if (idle !== undefined) input.turn_detection.idle_timeout_ms = idle;
    } else {
      input.turn_detection = { type: "semantic_vad", eagerness: $("vad-eagerness").value,
        create_response: $("vad-create").checked, interrupt_response: $("vad-interrupt").checked };
    }
    session.audio = { input };
    if ($("voice").value) session.audio.output = { voice: $("voice").value };
    return session;
  }

  function fillSelect(select, items, defaultValue) {
    const current = select.dataset.wanted || select.value;
    select.replaceChildren(new Option("(server default)", ""));
    for (const { value, label } of items) select.add(new Option(label, value));
    const wanted = [current, defaultValue].find((v) => v && items.some((i) => i.value === v));
    select.value = wanted || "";
    delete select.dataset.wanted;
  }

  function fillVoices(voices) {
    fillSelect($("voice"), voices.map((v) => ({ value: v.id, label: v.language ? `${v.name || v.id} (${v.language})` : (v.name || v.id) })));
  }

  function fillModels(models, defaultModel) {
    fillSelect($("model"), models.map((m) => ({ value: m, label: m === defaultModel ? `${m} (default)` : m })), defaultModel);
  }

  async function loadConfig() {
    const headers = {};
    const token = $("token").value.trim();
    if (token) headers["X-Playground-Token"] = token;
    let response;
    try {
      response = await fetch("/playground/config", { headers, cache: "no-store" });
    } catch {
      banner(UNREACHABLE(), "error");
      return;
    }
    if (!response.ok) return;
    serverConfig = await response.json();
    const c = serverConfig;
    $("token-row").hidden = !c.token_required;
    const serverRadio = document.querySelector("input[name=keysrc][value=server]");
    serverRadio.disabled = c.mode === "off" || (c.mode === "loopback" && !c.can_mint);
    if (serverRadio.disabled) document.querySelector("input[name=keysrc][value=own]").checked = true;
    updateKeyHint();
    if (c.voices) fillVoices(c.voices);
    if (c.models) fillModels(c.models, c.default_model);
    if (c.audio_output === false) $("modality").value = "text";
  }

  function updateKeyHint() {
    const c = serverConfig;
    let hint = "";
    if (keySource() === "own") {
      hint = "Your key is sent only to this server, as the Bearer key of the call; the page does not store it.";
    } else if (c && c.can_mint) {
      hint = `The page gets a temporary key (ek_…, valid ${Math.round(c.client_secret_ttl_s / 60)} min) from this server; `
        + "the server's API key never reaches the browser.";
    } else if (c && c.token_required) {
      hint = "Enter the playground token the operator gave you, or use your own key.";
    } else if (c) {
      hint = c.reason || "Paste an API key (sk-…) or an ephemeral key (ek_…).";
    }
    $("key-hint").textContent = hint;
  }

  // With a pasted API key, voices and models come from the API itself.
  async function loadOptionsWithKey() {
    const k = $("own-key").value.trim();
    if (!k || k.startsWith("ek_") || keySource() !== "own") return;
    const headers = { Authorization: `Bearer ${k}` };
    try {
      const [voices, models] = await Promise.all([
        fetch("/v1/voices", { headers }).then((r) => (r.ok ? r.json() : null)),
        fetch("/v1/models", { headers }).then((r) => (r.ok ? r.json() : null)),
      ]);
      if (voices && voices.data) fillVoices(voices.data);
      if (models && models.data) fillModels(models.data.map((m) => m.id), null);
    } catch { /* reported when connecting */ }
  }

  // ------------------------------------------------------------------ events pane

  function logEvent(dir, data) {
    const entry = { dir, t: now(), type: String((data && data.type) || "?"), data };
    events.push(entry);
    if (events.length > MAX_EVENTS) events.shift();
    renderEvent(entry);
  }

  function shorten(value) {
    return JSON.stringify(value, (k, v) => (typeof v === "string" && v.length > 2000
      ? `${v.slice(0, 2000)}… (${v.length} chars)` : v), 2);
  }

  function matchesFilter(el) {
    const terms = $("event-filter").value.toLowerCase().split(/[\s,]+/).filter(Boolean);
    const dir = $("event-dir").value;
    const type = el.dataset.type.toLowerCase();
    if (dir !== "all" && el.dataset.dir !== dir) return false;
    if ($("hide-deltas").checked && type.endsWith(".delta")) return false;
    return !terms.length || terms.some((t) => type.includes(t));
  }

  function applyFilter() {
    let shown = 0;
    for (const el of $("events").children) {
      el.hidden = !matchesFilter(el);
      if (!el.hidden) shown += 1;
    }
    updateEventCount(shown);
  }

  function updateEventCount(shown) {
    const total = $("events").children.length;
    $("event-count").textContent = shown === undefined || shown === total ? `(${total})` : `(${shown} of ${total})`;
  }

  function renderEvent(entry) {
    const box = $("events");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const el = document.createElement("details");
    el.className = `ev ${entry.dir}${entry.type === "error" ? " error" : ""}`;
    el.dataset.type = entry.type;
    el.dataset.dir = entry.dir;
    const summary = document.createElement("summary");
    const t = document.createElement("span");
    t.className = "t";
    t.textContent = `${((entry.t - (connectStartedAt || entry.t)) / 1000).toFixed(2)}s`;
    const arrow = document.createElement("span");
    arrow.className = "dir";
    arrow.textContent = { server: "↓", client: "↑", http: "⇄" }[entry.dir];
    arrow.title = { server: "from the server", client: "sent by this page", http: "HTTP request" }[entry.dir];
    const type = document.createElement("span");
    type.className = "type";
    type.textContent = entry.type;
    summary.append(t, arrow, type);
    el.append(summary);
    el.addEventListener("toggle", () => {  // JSON rendered on first open only
      if (el.open && !el.querySelector("pre")) {
        const pre = document.createElement("pre");
        pre.textContent = shorten(entry.data);
        el.append(pre);
      }
    });
    el.hidden = !matchesFilter(el);
    box.append(el);
    while (box.children.length > MAX_EVENT_NODES) box.firstElementChild.remove();
    if (!seenTypes.has(entry.type) && entry.dir !== "http") {
      seenTypes.add(entry.type);
      $("event-types").append(new Option(entry.type));
    }
    if (atBottom) box.scrollTop = box.scrollHeight;
    updateEventCount();
  }

  // ------------------------------------------------------------------ transcript

  const bubbles = new Map();  // item id -> {el, text, who}
  let badgeForNextAssistant = null;

  function bubble(itemId, role) {
    let b = bubbles.get(itemId);
    if (b) return b;
    const placeholder = $("transcript").querySelector(".placeholder");
    if (placeholder) placeholder.remove();
    const el = document.createElement("li");
    el.className = `msg ${role} pending`;
    el.dataset.itemId = itemId;
    const who = document.createElement("div");
    who.className = "who";
    const name = document.createElement("b");
    name.textContent = { user: "You", assistant: "Assistant", system: "System" }[role] || role;
    who.append(name);
    const text = document.createElement("div");
    text.className = "text";
    el.append(who, text);
    $("transcript").append(el);
    b = { el, text, who, role, createdAt: now() };
    bubbles.set(itemId, b);
    if (role === "assistant" && badgeForNextAssistant) {
      addBadge(b, badgeForNextAssistant.text, badgeForNextAssistant.title, "lat");
      badgeForNextAssistant = null;
    }
    scrollTranscript();
    return b;
  }

  function scrollTranscript() {
    const box = $("transcript");
    box.scrollTop = box.scrollHeight;
  }

  function setText(b, text, final) {
    b.text.textContent = text;
    if (final) b.el.classList.remove("pending");
    scrollTranscript();
  }

  function addBadge(b, text, title, cls = "") {
    const badge = document.createElement("span");
    badge.className = `badge ${cls}`;
    badge.textContent = text;
    if (title) badge.title = title;
    b.who.append(badge);
  }

  function onItemAdded(item) {
    if (!item || !item.id) return;
    if (item.type === "message") {
      const b = bubble(item.id, item.role);
      const parts = item.content || [];
      const texts = parts.map((p) => p.text || p.transcript || "").filter(Boolean);
      if (texts.length) setText(b, texts.join(" "), true);
    } else if (item.type === "function_call") {
      const b = bubble(item.id, "tool");
      setText(b, `function call ${item.name || ""}(${item.arguments || ""})`, true);
    } else if (item.type === "function_call_output") {
      const b = bubble(item.id, "tool");
      setText(b, `function output: ${item.output || ""}`, true);
    }
  }

  // ------------------------------------------------------------------ latency

  // End of speech: the local mic level, else the server's speech_stopped minus the silence it waited.
  let micLoudAt = 0;
  let micFloor = 0.01;
  let pendingTurn = null;  // {start, method, since, responseSeen}

  function silenceMs() {
    const td = state.session && state.session.audio && state.session.audio.input
      && state.session.audio.input.turn_detection;
    if (!td) return 0;
    if (td.type === "server_vad") return td.silence_duration_ms || 0;
    return { low: 1500, medium: 800, high: 500, auto: 800 }[td.eagerness] || 800;
  }

  function onSpeechStopped() {
    const arrival = now();
    const wait = silenceMs();
    if (micLoudAt && arrival - micLoudAt >= 0 && arrival - micLoudAt < wait + 1500) {
      pendingTurn = { start: micLoudAt, method: "mic level", since: arrival, responseSeen: false };
    } else {
      pendingTurn = { start: arrival - wait, method: "speech_stopped − silence_duration_ms", since: arrival,
        responseSeen: false };
    }
  }

  function recordLatency(kind) {
    if (!pendingTurn || !pendingTurn.responseSeen) return;
    const turn = pendingTurn;
    const ms = Math.max(0, Math.round(now() - turn.start));
    const entry = { ms, method: turn.method, kind, at: Date.now() };
    pendingTurn = null;
    state.latencies.push(entry);
    $("latency").textContent = `${ms} ms`;
    const sorted = state.latencies.map((l) => l.ms).sort((a, b) => a - b);
    const median = sorted[Math.floor((sorted.length - 1) / 2)];
    $("latency-detail").textContent = `${kind}, end of speech from ${entry.method}`
      + (sorted.length > 1 ? ` · median ${median} ms over ${sorted.length} turns` : "");
    const title = `end of speech (${entry.method}) → ${kind}`;
    // The reply of this turn: the newest assistant bubble, if it appeared after the turn ended.
    const last = [...bubbles.values()].filter((b) => b.role === "assistant").pop();
    if (last && !last.el.querySelector(".badge.lat") && last.createdAt >= turn.since) {
      addBadge(last, `${ms} ms`, title, "lat");
    } else {
      badgeForNextAssistant = { text: `${ms} ms`, title };
    }
  }

  // ------------------------------------------------------------------ audio

  function ensureAudioContext() {
    if (!audioCtx) audioCtx = new AudioContext();
    if (audioCtx.state !== "running") audioCtx.resume().catch(() => {});
    return audioCtx;
  }

  // RMS of a stream every SAMPLE_MS through an AnalyserNode (it runs without reaching the speakers).
  function sample(stream, onLevel) {
    const ctx = ensureAudioContext();
    const source = ctx.createMediaStreamSource(stream);
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 1024;
    source.connect(analyser);
    const buf = new Float32Array(analyser.fftSize);
    const timer = setInterval(() => {
      analyser.getFloatTimeDomainData(buf);
      let sum = 0;
      for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
      onLevel(Math.sqrt(sum / buf.length));
    }, SAMPLE_MS);
    samplers.push(() => { clearInterval(timer); source.disconnect(); });
  }

  function meterWidth(rms) {
    // dBFS -60..0 mapped to 0..100 %
    const db = 20 * Math.log10(Math.max(rms, 1e-6));
    return `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100)).toFixed(0)}%`;
  }

  function onMicLevel(rms) {
    if (rms > state.maxMicLevel) state.maxMicLevel = rms;
    $("mic-meter").style.width = $("mute").checked ? "0%" : meterWidth(rms);
    // A slowly rising noise floor; speech is well above it.
    micFloor = rms < micFloor ? rms : micFloor + (rms - micFloor) * 0.002;
    if (!$("mute").checked && rms > Math.max(MIC_MIN_SPEECH_RMS, micFloor * 3)) micLoudAt = now();
  }

  function onOutputLevel(rms) {
    if (rms > state.maxOutputLevel) state.maxOutputLevel = rms;
    $("out-meter").style.width = meterWidth(rms);
    if (rms > OUT_AUDIBLE_RMS) {
      state.audioArrived = true;
      recordLatency("first audio heard");
    }
  }

  async function openMic() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      state.micError = "unavailable";
      banner(window.isSecureContext
        ? "This browser cannot capture audio here. You can still type messages."
        : "Browsers allow the microphone only on https:// pages or http://localhost. Open the playground "
          + "that way to talk; you can still type messages.", "warn");
      return null;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
      state.micOpen = true;
      state.micError = null;
      return stream;
    } catch (err) {
      state.micError = err.name || String(err);
      const messages = {
        NotAllowedError: "Microphone access was refused. Allow the microphone for this page (the icon in the "
          + "address bar), then press Reconnect. Meanwhile you can type messages.",
        SecurityError: "Microphone access was refused by the browser's security policy. You can still type messages.",
        NotFoundError: "No microphone was found. Connect one and press Reconnect; you can still type messages.",
        NotReadableError: "The microphone is in use by another application, or the system blocked it. "
          + "Close the other application and press Reconnect; you can still type messages.",
      };
      banner(messages[err.name] || `The microphone could not be opened (${err.name}: ${err.message}). `
        + "You can still type messages.", "warn");
      return null;
    }
  }

  // ------------------------------------------------------------------ connection

  async function obtainKey() {
    if (keySource() === "own") {
      const value = $("own-key").value.trim();
      if (!value) {
        throw new UserError("Paste an API key (sk-…) or an ephemeral key (ek_…) first — or choose a "
          + "temporary key from this server.");
      }
      return { value, kind: value.startsWith("ek_") ? "your ephemeral key" : "your API key", expiresAt: null };
    }
    const headers = { "Content-Type": "application/json" };
    const token = $("token").value.trim();
    if (token) headers["X-Playground-Token"] = token;
    const response = await http("POST", "/playground/session", { headers, body: "{}" });
    const body = await readBody(response);
    if (!response.ok) {
      if (response.status === 403) {
        throw new UserError(`${errorText(body)}`);
      }
      throw httpFailure("Getting a temporary key", response.status, body);
    }
    return { value: body.value, kind: "temporary key", expiresAt: body.expires_at };
  }

  async function iceServers(keyValue) {
    try {
      const response = await fetch("/v1/realtime/ice-servers", { headers: { Authorization: `Bearer ${keyValue}` } });
      if (!response.ok) return [];
      return (await response.json()).ice_servers || [];
    } catch {
      return [];
    }
  }

  function waitForIceGathering(peer, timeoutMs) {
    if (peer.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, timeoutMs);
      peer.addEventListener("icegatheringstatechange", () => {
        if (peer.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
      });
    });
  }

  function send(event) {
    if (!dc || dc.readyState !== "open") throw new UserError("Not connected: press Connect first.");
    const withId = { event_id: `evt_${Math.random().toString(36).slice(2, 12)}`, ...event };
    dc.send(JSON.stringify(withId));
    logEvent("client", withId);
  }

  async function connect() {
    if (state.phase === "connecting" || state.phase === "connected") return;
    const seq = ++connectSeq;
    const stale = () => seq !== connectSeq;
    clearBanner();
    connectStartedAt = now();
    pendingTurn = null;
    let session;
    try {
      session = buildSession();
    } catch (err) {
      fail(err);
      return;
    }
    saveSettings();
    ensureAudioContext();  // inside the click: browsers let audio start after a user gesture
    setPhase("connecting", "Getting a key…");
    try {
      key = await obtainKey();
      if (stale()) return;
      state.keyKind = key.kind;
      state.keyExpiresAt = key.expiresAt;

      setPhase("connecting", "Opening the microphone…");
      mic = await openMic();
      if (stale()) { stopMic(); return; }
      if (mic) sample(mic, onMicLevel);

      setPhase("connecting", "Connecting…");
      pc = new RTCPeerConnection({ iceServers: await iceServers(key.value) });
      if (stale()) return;
      const peer = pc;
      peer.addEventListener("connectionstatechange", () => {
        if (peer !== pc) return;
        if (peer.connectionState === "failed") fail(new UserError("The connection to the server failed (no network path "
          + "for WebRTC media: check firewalls, or configure STUN/TURN on the server). Press Reconnect to try again."));
        else if (peer.connectionState === "disconnected") banner("The connection is interrupted; waiting for it to come back…", "warn");
        else if (peer.connectionState === "connected" && state.phase === "connected") clearBanner();
      });
      peer.addEventListener("track", (e) => {
        state.remoteTrack = true;
        const stream = e.streams[0] || new MediaStream([e.track]);
        const audio = $("remote-audio");
        audio.srcObject = stream;  // Chrome feeds a remote stream to WebAudio only while an element plays it
        audio.play().catch(() => banner("The browser blocked audio playback: click anywhere on the page.", "warn"));
        sample(stream, onOutputLevel);
      });
      if (mic) {
        const track = mic.getAudioTracks()[0];
        track.enabled = !$("mute").checked;
        peer.addTrack(track, mic);
      } else {
        peer.addTransceiver("audio", { direction: "recvonly" });
      }

      dc = peer.createDataChannel("oai-events");
      const channel = dc;
      channel.addEventListener("open", () => {
        if (channel !== dc) return;
        clearTimeout(connectTimer);
        setPhase("connected", mic ? "Connected — speak now" : "Connected (no microphone) — type a message");
        if (state.micError && $("banner").hidden) banner("Connected without a microphone: type your messages.", "warn");
        $("message").focus({ preventScroll: true });
      });
      channel.addEventListener("close", () => {
        if (channel !== dc) return;
        teardown();
        setPhase("closed", "Disconnected");
        banner("The call ended (the server hung up or the connection closed). Press Reconnect to start again.", "info");
      });
      channel.addEventListener("message", (m) => onServerMessage(m.data));

      await peer.setLocalDescription(await peer.createOffer());
      await waitForIceGathering(peer, 3000);
      if (stale()) return;

      const form = new FormData();
      form.append("sdp", peer.localDescription.sdp);
      form.append("session", JSON.stringify(session));
      logEvent("client", { type: "session (in the offer)", session });
      const response = await http("POST", "/v1/realtime/calls", {
        headers: { Authorization: `Bearer ${key.value}`, Accept: "application/sdp" }, body: form });
      const answer = await response.text();
      if (stale()) return;
      if (!response.ok) {
        let body = answer;
        try { body = JSON.parse(answer); } catch { /* text */ }
        throw httpFailure("Creating the call", response.status, body);
      }
      state.callId = (response.headers.get("Location") || "").split("/").pop() || null;
      const expires = key.expiresAt ? `, key expires ${new Date(key.expiresAt * 1000).toLocaleTimeString()}` : "";
      $("call-info").textContent = `${state.callId || "call"} · ${key.kind}${expires}`;
      await peer.setRemoteDescription({ type: "answer", sdp: answer });
      if (state.phase !== "connected") setPhase("connecting", "Connecting the audio…");
      connectTimer = setTimeout(() => {
        if (!stale() && state.phase === "connecting") {
          fail(new UserError("The call was accepted but the connection never came up (WebRTC media blocked?). "
            + "Press Reconnect to try again."));
        }
      }, CONNECT_TIMEOUT_MS);
    } catch (err) {
      if (!stale()) fail(err);
    }
  }

  function stopMic() {
    if (mic) for (const track of mic.getTracks()) track.stop();
    mic = null;
  }

  function teardown() {
    clearTimeout(connectTimer);
    for (const stop of samplers) stop();
    samplers = [];
    const channel = dc;
    const peer = pc;
    dc = null;
    pc = null;
    if (channel) try { channel.close(); } catch { /* closed */ }
    if (peer) try { peer.close(); } catch { /* closed */ }
    stopMic();
    state.responseActive = false;
    $("mic-meter").style.width = "0%";
    $("out-meter").style.width = "0%";
  }

  function disconnect() {
    connectSeq++;
    const callId = state.callId;
    const keyValue = key && key.value;
    teardown();
    if (callId && keyValue) {
      // Closing the peer connection ends the call anyway; the hangup makes it immediate.
      fetch(`/v1/realtime/calls/${encodeURIComponent(callId)}/hangup`, {
        method: "POST", headers: { Authorization: `Bearer ${keyValue}` }, keepalive: true }).catch(() => {});
    }
    state.callId = null;
    setPhase("closed", "Disconnected");
  }

  async function reconnect() {
    if (state.phase === "connecting" || state.phase === "connected") disconnect();
    await connect();
  }

  // ------------------------------------------------------------------ server events

  function onServerMessage(raw) {
    let event;
    try {
      event = JSON.parse(raw);
    } catch {
      logEvent("server", { type: "(unparsable)", raw: String(raw).slice(0, 2000) });
      return;
    }
    logEvent("server", event);
    const type = event.type;
    switch (type) {
      case "session.created":
      case "session.updated":
        state.session = event.session;
        break;
      case "input_audio_buffer.speech_started":
        pendingTurn = null;
        break;
      case "input_audio_buffer.speech_stopped":
        onSpeechStopped();
        break;
      case "conversation.item.added":
      case "conversation.item.created":
        onItemAdded(event.item);
        break;
      case "conversation.item.input_audio_transcription.delta": {
        const b = bubble(event.item_id, "user");
        setText(b, b.text.textContent + (event.delta || ""), false);
        break;
      }
      case "conversation.item.input_audio_transcription.completed":
        setText(bubble(event.item_id, "user"), event.transcript || "(silence)", true);
        break;
      case "conversation.item.input_audio_transcription.failed":
        setText(bubble(event.item_id, "user"), "(could not transcribe)", true);
        break;
      case "response.created":
        state.responseActive = true;
        if (pendingTurn) pendingTurn.responseSeen = true;
        break;
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta": {
        const b = bubble(event.item_id, "assistant");
        setText(b, b.text.textContent + (event.delta || ""), false);
        if (type === "response.output_text.delta" && state.session
            && (state.session.output_modalities || []).includes("text")) recordLatency("first text");
        break;
      }
      case "response.output_audio_transcript.done":
        setText(bubble(event.item_id, "assistant"), event.transcript || "", true);
        break;
      case "response.output_text.done":
        setText(bubble(event.item_id, "assistant"), event.text || "", true);
        break;
      case "conversation.item.truncated": {
        const b = bubbles.get(event.item_id);
        if (b) addBadge(b, "interrupted", `truncated at ${event.audio_end_ms} ms of audio`);
        break;
      }
      case "conversation.item.deleted": {
        const b = bubbles.get(event.item_id);
        if (b) { b.el.remove(); bubbles.delete(event.item_id); }
        break;
      }
      case "response.done": {
        state.responseActive = false;
        const r = event.response || {};
        for (const item of r.output || []) {
          const b = bubbles.get(item.id);
          if (!b) continue;
          b.el.classList.remove("pending");
          if (r.status && r.status !== "completed") {
            const reason = r.status_details && (r.status_details.reason || (r.status_details.error || {}).message);
            addBadge(b, r.status, reason || "");
          }
        }
        if (r.status === "failed") {
          const error = r.status_details && r.status_details.error;
          banner(`The response failed: ${(error && error.message) || "unknown error"}`, "warn");
        }
        break;
      }
      case "error":
        banner(`Server error: ${errorText(event)}`, "warn");
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------ actions

  function sendText(text) {
    if (state.responseActive) {
      send({ type: "response.cancel" });
      send({ type: "output_audio_buffer.clear" });
      state.responseActive = false;
    }
    send({ type: "conversation.item.create",
      item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
    send({ type: "response.create" });
    pendingTurn = { start: now(), method: "Send pressed", since: now(), responseSeen: false };
  }

  function wire() {
    $("connect").addEventListener("click", () => { connect(); });
    $("disconnect").addEventListener("click", disconnect);
    $("reconnect").addEventListener("click", () => { reconnect(); });
    $("banner-close").addEventListener("click", clearBanner);
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("message").value.trim();
      if (!text) return;
      try {
        sendText(text);
        $("message").value = "";
      } catch (err) {
        banner(err.message, "warn");
      }
    });
    $("commit").addEventListener("click", () => {
      try {
        send({ type: "input_audio_buffer.commit" });
        send({ type: "response.create" });
        pendingTurn = { start: micLoudAt || now(), method: "mic level", since: now(), responseSeen: false };
      } catch (err) {
        banner(err.message, "warn");
      }
    });
    $("settings").addEventListener("submit", (e) => {
      e.preventDefault();
      try {
        const session = buildSession();
        saveSettings();
        if (state.phase === "connected") {
          send({ type: "session.update", session });
          $("apply-note").textContent = "Sent as session.update.";
        } else {
          $("apply-note").textContent = "Saved; used when you connect.";
        }
      } catch (err) {
        banner(err.message, "warn");
      }
    });
    $("vad").addEventListener("change", showVadParams);
    $("mute").addEventListener("change", () => {
      if (mic) for (const track of mic.getAudioTracks()) track.enabled = !$("mute").checked;
    });
    for (const radio of document.querySelectorAll("input[name=keysrc]")) {
      radio.addEventListener("change", () => { updateKeyHint(); loadOptionsWithKey(); });
    }
    $("own-key").addEventListener("input", () => {
      document.querySelector("input[name=keysrc][value=own]").checked = true;
      updateKeyHint();
    });
    $("own-key").addEventListener("change", loadOptionsWithKey);
    $("token").addEventListener("change", loadConfig);
    $("event-filter").addEventListener("input", applyFilter);
    $("event-dir").addEventListener("change", applyFilter);
    $("hide-deltas").addEventListener("change", applyFilter);
    $("clear-events").addEventListener("click", () => { $("events").replaceChildren(); updateEventCount(); });
    window.addEventListener("pagehide", () => { if (state.phase === "connected") disconnect(); });
  }

  window.playground = { state, events, connect, disconnect, reconnect, sendText, buildSession };

  loadSettings();
  showVadParams();
  wire();
  setPhase("idle", "Not connected");
  updateEventCount();
  loadConfig();
})();
