// Re-validate server events the way the @openai/agents realtime transport does, with its own code.
//
// The SDK handles every incoming server event in two steps (OpenAIRealtimeBase._onMessage):
//  1. `realtimeServerEventSchema.safeParse(event)`: a zod discriminated union over the event types
//     the SDK knows. An event of a known type that fails it is NOT an error in the SDK: it falls
//     back to `genericEventSchema` and is silently ignored (no item_update, no turn_done, ...).
//     Events of types the union does not list are "generic" by design: only {type, event_id?}.
//  2. For a typed event, strict `.parse()` calls on the SDK's item schemas (realtimeMessageItemSchema
//     for message items of conversation.item.added/done/retrieved and response.output_item.*,
//     realtimeToolCallItem for completed function calls, ...). These throw inside the transport's
//     message listener: the crash users see.
// `checkEvent` runs step 1 with the SDK's exported-by-file schemas and step 2 by feeding the event
// to a real, unconnected OpenAIRealtimeWebSocket transport's `_onMessage`.

import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

import { OpenAIRealtimeWebSocket } from '@openai/agents/realtime';
import { z } from 'zod';

const require = createRequire(import.meta.url);
// The package's "exports" map hides its dist files; resolve the entry point and load its siblings
// (the very modules the transport itself imports, so the same schema objects).
const distDir = path.dirname(require.resolve('@openai/agents-realtime'));
const distModule = (name) => import(pathToFileURL(path.join(distDir, name)).href);

const events = await distModule('openaiRealtimeEvents.mjs');
const items = await distModule('items.mjs');
const metadata = await distModule('metadata.mjs');

export const SDK_VERSION = metadata.default?.version ?? metadata.METADATA?.version ?? 'unknown';
export const { realtimeServerEventSchema, genericEventSchema } = events;
export const itemSchemas = {
  realtimeMessageItemSchema: items.realtimeMessageItemSchema,
  realtimeToolCallItem: items.realtimeToolCallItem,
  realtimeMcpCallItem: items.realtimeMcpCallItem,
};

/** The event types the SDK validates with a typed schema (the union's discriminator values). */
export const TYPED_EVENT_TYPES = new Set(
  realtimeServerEventSchema.options.flatMap((option) => [...option.shape.type.values]),
);

// A zod issue as plain JSON, union branches included (they say which field each alternative lacks).
function plainIssue(issue, prefix = []) {
  const fullPath = [...prefix, ...issue.path];
  const out = { path: fullPath.join('.'), code: issue.code, message: issue.message };
  if (issue.code === 'invalid_union' && Array.isArray(issue.errors)) {
    out.branches = issue.errors.map((branch) => branch.map((inner) => plainIssue(inner, fullPath)));
  }
  return out;
}

export function describeError(error) {
  if (error && Array.isArray(error.issues)) {
    return { name: error.name ?? 'ZodError', issues: error.issues.map((issue) => plainIssue(issue)),
      message: z.prettifyError(error).slice(0, 2000) };
  }
  if (error instanceof Error) return { name: error.name, message: error.message.slice(0, 2000) };
  return { name: typeof error, message: String(error).slice(0, 2000) };
}

// One transport reused for every check: _onMessage keeps no state that changes the validation, and
// its outgoing requests (conversation.item.retrieve after a transcript) go nowhere.
const probe = new OpenAIRealtimeWebSocket();
probe.sendEvent = () => {};
probe.requestResponse = () => {};
let probeErrors = [];
probe.on('error', (event) => probeErrors.push(event));

/**
 * Check one server event. Returns {ok, type, typed, errors}; `typed` tells whether the SDK has a
 * schema for this type (false: it accepts it generically and ignores it).
 */
export function checkEvent(event) {
  const errors = [];
  const type = event && typeof event === 'object' ? event.type : undefined;
  if (typeof type !== 'string') {
    return { ok: false, type: null, typed: false, errors: [{ step: 'shape', message: 'not an object with a string "type"' }] };
  }
  const typed = TYPED_EVENT_TYPES.has(type);
  if (typed) {
    const parsed = realtimeServerEventSchema.safeParse(event);
    if (!parsed.success) {
      errors.push({ step: 'realtimeServerEventSchema', ...describeError(parsed.error),
        effect: 'the SDK drops this event to a generic one and ignores it' });
    }
  } else {
    const parsed = genericEventSchema.safeParse(event);
    if (!parsed.success) {
      errors.push({ step: 'genericEventSchema', ...describeError(parsed.error), effect: 'the SDK drops it entirely' });
    }
  }
  probeErrors = [];
  try {
    probe._onMessage({ data: JSON.stringify(event) });
  } catch (error) {
    errors.push({ step: 'transport._onMessage', ...describeError(error),
      effect: 'thrown inside the transport message listener (uncaught in the app)' });
  }
  // A server `error` event is reported by the SDK as an error by design: not a schema failure.
  for (const emitted of probeErrors) {
    if (type !== 'error') {
      errors.push({ step: 'transport error event', ...describeError(emitted?.error ?? emitted) });
    }
  }
  return { ok: errors.length === 0, type, typed, errors };
}
