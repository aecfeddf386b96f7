"""Fitting a conversation into the model's context (the session's `truncation` setting).

- ``auto``: when the prompt plus the room kept for the reply would not fit, the oldest items are
  left out until it does.
- ``retention_ratio`` r: the same trigger (or the conversation growing past
  ``token_limits.post_instructions``), but items are left out until the conversation uses at most
  r x its budget, so truncation happens once in a while instead of on every turn, and the prompt
  prefix (hence the KV cache) stays stable in between.
- ``disabled``: the response fails with ``context_length_exceeded`` instead.

The system instructions (and tool definitions) are never left out. Left-out items stay in the
conversation (the client's view is unchanged); the session remembers them, so later prompts keep
starting at the same place. A function call's outputs go with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backends.llm import ChatMessage
from ..protocol.items import Item

Build = Callable[[Sequence[Item]], list[ChatMessage]]
Count = Callable[[list[ChatMessage]], Awaitable[int]]

# Room kept for the reply when max_output_tokens is "inf" (at most a quarter of the context).
DEFAULT_REPLY_RESERVE = 1024


class ContextOverflow(Exception):
    """The prompt cannot fit (truncation disabled, or not even the last item fits)."""

    def __init__(self, message: str, prompt_tokens: int, context_length: int):
        super().__init__(message)
        self.message = message
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


@dataclass(slots=True)
class Fitted:
    messages: list[ChatMessage]
    prompt_tokens: int  # as counted (tool definitions included)
    dropped: list[str] = field(default_factory=list)  # item ids left out by this call


def reply_reserve(max_output_tokens: int | str, context_length: int) -> int:
    """Tokens kept free for the reply."""
    want = max_output_tokens if isinstance(max_output_tokens, int) else DEFAULT_REPLY_RESERVE
    return max(1, min(want, context_length // 4))


def policy_of(truncation: Any) -> tuple[str, float, int | None]:
    """(kind, retention ratio, post_instructions limit) of a session `truncation` value."""
    if truncation == "disabled":
        return "disabled", 1.0, None
    if truncation == "auto" or truncation is None:
        return "auto", 1.0, None
    ratio = float(getattr(truncation, "retention_ratio", 1.0))
    limits = getattr(truncation, "token_limits", None)
    post = getattr(limits, "post_instructions", None) if limits is not None else None
    return "retention_ratio", ratio, post


def _fingerprint(item: Item) -> str:
    return hashlib.sha1(item.model_dump_json(exclude={"status"}).encode()).hexdigest()


class ContextWindow:
    """Per session: which items prompts leave out, and cached token counts."""

    def __init__(self) -> None:
        self.dropped: set[str] = set()
        self._sizes: dict[tuple[str, str], int] = {}

    async def fit(self, items: Sequence[Item], *, build: Build, count: Count, context_length: int,
                  reserve: int, truncation: Any, extra_tokens: int = 0, persist: bool = True) -> Fitted:
        """The messages for a prompt over `items`, after truncation.

        `count` sees the tools the response offers, so `extra_tokens` is for anything else. `persist`: remember
        what was left out for the next prompts (the default conversation; not out-of-band input).
        """
        count = _nonempty(count)
        kept = [it for it in items if not (persist and it.id in self.dropped)]
        kept = _without_orphans(kept)
        messages = build(kept)
        total = await count(messages) + extra_tokens
        kind, ratio, post_limit = policy_of(truncation)
        limit = context_length - reserve
        fixed = await count(build([])) + extra_tokens
        over_post = post_limit is not None and total - fixed > post_limit
        if total <= limit and not over_post:
            return Fitted(messages, total)
        if kind == "disabled":
            raise ContextOverflow(
                f"The conversation is {total} tokens and {reserve} more are kept for the reply, which exceeds "
                f"the model's context of {context_length} tokens; truncation is disabled for this session. "
                "Delete items or enable truncation.", total, context_length)
        budget = limit - fixed
        if post_limit is not None:
            budget = min(budget, post_limit)
        if budget <= 0:
            raise ContextOverflow(
                f"The instructions and tools alone are {fixed} tokens, which leaves no room for the "
                f"conversation in the model's context of {context_length} tokens.", total, context_length)
        target = budget * ratio
        base = await count(build([]))
        sizes = []
        for item in kept:
            key = (item.id or "", _fingerprint(item))
            size = self._sizes.get(key)
            if size is None:
                size = self._sizes[key] = max(0, await count(build([item])) - base)
            sizes.append(size)
        running = sum(sizes)
        cut = 0
        while cut < len(kept) - 1 and running > target:
            running -= sizes[cut]
            cut += 1
        dropped = list(kept[:cut])
        kept = _without_orphans(kept[cut:], dropped)
        # Exact check (the per-item sizes are estimates): keep leaving out the oldest until it fits.
        while True:
            messages = build(kept)
            total = await count(messages) + extra_tokens
            if total <= limit or len(kept) <= 1:
                break
            dropped.append(kept[0])
            kept = _without_orphans(kept[1:], dropped)
        if total > limit:
            raise ContextOverflow(
                f"The latest item alone makes the prompt {total} tokens, more than the model's context of "
                f"{context_length} tokens allows with {reserve} kept for the reply.", total, context_length)
        ids = [it.id for it in dropped if it.id]
        if persist:
            self.dropped.update(ids)
            self._prune(items)
        return Fitted(messages, total, ids)

    def _prune(self, items: Sequence[Item]) -> None:
        """Forget counts and ids of items no longer in the conversation."""
        live = {it.id for it in items}
        self.dropped &= live
        if len(self._sizes) > 4 * len(live) + 64:
            self._sizes = {k: v for k, v in self._sizes.items() if k[0] in live}


def _nonempty(count: Count) -> Count:
    """Counting no messages at all is 0 (some chat templates cannot render an empty conversation)."""
    async def wrapped(messages: list[ChatMessage]) -> int:
        return await count(messages) if messages else 0
    return wrapped


def _without_orphans(items: list[Item], dropped: list[Item] | None = None) -> list[Item]:
    """Leave out function_call_output items whose call is not in the prompt."""
    calls = {it.call_id for it in items if it.type == "function_call"}
    out = []
    for it in items:
        if it.type == "function_call_output" and it.call_id not in calls:
            if dropped is not None:
                dropped.append(it)
            continue
        out.append(it)
    return out
