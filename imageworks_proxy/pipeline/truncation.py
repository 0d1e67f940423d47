"""Vision history truncation: keep system messages, the last N turns and the current turn."""

from __future__ import annotations

import copy
from typing import Any

from imageworks_proxy.pipeline.stage import ChatContext, Stage
from imageworks_proxy.wire.content import image_parts


def truncate_history(
    messages: list[dict[str, Any]], *, keep_system: bool, keep_last_n_turns: int
) -> tuple[list[dict[str, Any]], int]:
    """Return (kept messages, number dropped).

    A turn is a user message and everything up to the next user message, so a tool call is never split
    from its result. The current turn starts at the last user message. When no kept message has an image
    any more, the most recent image part(s) of the dropped turns are carried into the current user message,
    so a follow-up question about the picture still works.
    """
    user_idx = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not user_idx:
        return messages, 0
    current = user_idx[-1]
    earlier_starts = user_idx[:-1]
    kept_starts = earlier_starts[-keep_last_n_turns:] if keep_last_n_turns > 0 else []
    first_kept = kept_starts[0] if kept_starts else current
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if msg.get("role") == "system":
            (kept if keep_system else dropped).append(msg)
        elif i >= first_kept:
            kept.append(msg)
        else:
            dropped.append(msg)
    if not dropped:
        return messages, 0
    current_msg = messages[current]
    if not any(True for _ in image_parts(kept)):  # no image left at all (the current message has none either)
        carried: list[dict[str, Any]] = []
        for msg in reversed(dropped):
            found = [p for _, _, p in image_parts([msg])]
            if found:
                carried = [copy.deepcopy(p) for p in found]
                break
        if carried:
            content = current_msg.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            new_msg = dict(current_msg)
            new_msg["content"] = carried + parts
            kept = [new_msg if m is current_msg else m for m in kept]
    return kept, len(dropped)


class VisionHistoryTruncation(Stage):
    """Applies :func:`truncate_history` when the request carries images for a vision model."""

    name = "vision-history"
    order = 500

    async def request(self, ctx: ChatContext) -> None:
        cfg = self.config
        if not cfg.vision_truncate_history or not ctx.images or ctx.entry is None or not ctx.can("vision"):
            return
        kept, dropped = truncate_history(
            ctx.body["messages"],
            keep_system=cfg.vision_keep_system,
            keep_last_n_turns=cfg.vision_keep_last_n_turns,
        )
        if dropped:
            ctx.body["messages"] = kept
            ctx.truncated_messages = dropped
