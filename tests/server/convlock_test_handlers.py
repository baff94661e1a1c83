"""Handlers the server tests load with ``--handler convlock_test_handlers:control``.

``control`` behaves like the demo handler, except for messages starting
with ``ctl:``, which misbehave on purpose:

* ``ctl:boom``: change the state, then raise;
* ``ctl:sleep:<s>``: change the state, then ``await asyncio.sleep(s)``;
* ``ctl:block:<s>``: ``time.sleep(s)``, freezing the whole process as a long GC pause would;
* ``ctl:bad``: return an object that is not a response;
* ``ctl:nan``: put NaN (not JSON) into the state;
* ``ctl:cancel``: change the state, then raise ``asyncio.CancelledError`` itself
  (as a library whose own task was cancelled may), without being cancelled;
* ``ctl:leak:<text>``: raise an exception whose message quotes the text and a result;
* ``ctl:unjson:<text>``: return a response holding the text and a value that is not JSON.
"""

from __future__ import annotations

import asyncio
import time

from convlock.server import Conversation, HandlerResult, Message


async def control(message: Message, conversation: Conversation) -> HandlerResult:
    """The demo handler, plus the ``ctl:`` misbehaviours listed in the module docstring."""
    text = message.text
    if text == "ctl:boom":
        conversation.state["dirty"] = True
        raise RuntimeError("boom on purpose")
    if text == "ctl:cancel":
        conversation.state["dirty"] = True
        raise asyncio.CancelledError("raised by the handler, not a cancellation of the request")
    if text.startswith("ctl:leak:"):
        raise ValueError(f"could not handle {text!r}; partial result: {['reply to ' + text]!r}")
    if text.startswith("ctl:unjson:"):
        return [{"text": text, "when": object()}]
    if text.startswith("ctl:sleep:"):
        conversation.state["dirty"] = True
        await asyncio.sleep(float(text.rsplit(":", 1)[1]))
    elif text.startswith("ctl:block:"):
        time.sleep(float(text.rsplit(":", 1)[1]))  # noqa: ASYNC251  (the point: freeze the event loop)
    elif text == "ctl:bad":
        return [object()]  # type: ignore[list-item]
    elif text == "ctl:window":
        # What the handler sees of a long conversation: its window, the total, its turn.
        older = await conversation.older_events(3)
        return [
            f"{len(conversation.events)}/{conversation.event_count}/{conversation.turn}/"
            + ",".join(str(e.get("text")) for e in older)
        ]
    elif text == "ctl:nan":
        conversation.state["x"] = float("nan")
    conversation.state["turns"] = conversation.turn
    return [f"#{conversation.turn}: {text}"]
