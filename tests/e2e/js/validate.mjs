// Long-running validator: server events in, one verdict out per event, with the @openai/agents
// SDK's own zod schemas and message handling (see lib/sdk_check.mjs).
//
// stdin:  JSON lines; each either a server event, or {"ref": <anything>, "event": <server event>}.
// stdout: first {"ready": true, "sdk_version", "typed_event_types": [...]}, then per input line
//         {"ref", "ok", "type", "typed", "errors": [...]} in input order. Exits at end of input.

import readline from 'node:readline';

import { SDK_VERSION, TYPED_EVENT_TYPES, checkEvent } from './lib/sdk_check.mjs';

const write = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

write({ ready: true, sdk_version: SDK_VERSION, typed_event_types: [...TYPED_EVENT_TYPES].sort() });

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let input;
  try {
    input = JSON.parse(line);
  } catch (error) {
    write({ ref: null, ok: false, type: null, typed: false, errors: [{ step: 'json', message: String(error) }] });
    continue;
  }
  const wrapped = input && typeof input === 'object' && 'event' in input && !('type' in input);
  const ref = wrapped ? (input.ref ?? null) : null;
  write({ ref, ...checkEvent(wrapped ? input.event : input) });
}
