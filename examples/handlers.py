"""Example handlers for ``convlock run --handler examples.handlers:<name>``.

Run from the repository root (``convlock run`` puts the working directory on
``sys.path``)::

    convlock run --handler examples.handlers:counter

A handler is ``async def handler(message, conversation)``. It reads
``message.text``/``message.metadata`` and ``conversation.events``, may change
``conversation.state`` (a JSON dict saved only if the handler returns in
time), and returns ``None``, a ``str``, or a list of ``str`` and ``dict``.
"""

from __future__ import annotations

import re

from convlock.server import Conversation, HandlerResult, Message

_NAME = re.compile(r"\bmy name is (\w+)", re.IGNORECASE)


async def echo(message: Message, conversation: Conversation) -> HandlerResult:
    """Answer with the text itself: the smallest possible handler."""
    return message.text


async def counter(message: Message, conversation: Conversation) -> HandlerResult:
    """Count the user's messages and remember their name, in the conversation's state.

    Shows the three kinds of answer: a plain string, a dict with extra keys
    (sent to the client as is), and several answers at once.
    """
    state = conversation.state
    state["count"] = state.get("count", 0) + 1
    found = _NAME.search(message.text)
    if found:
        state["name"] = found.group(1)
        greeting = f"Nice to meet you, {state['name']}!"
        return [greeting, {"text": "Ask me 'how many?'", "buttons": ["how many?"]}]
    if "how many" in message.text.lower():
        who = state.get("name", "you")
        return f"{who} sent {state['count']} messages so far (this is turn {conversation.turn})."
    if message.text.lower() == "history":
        return [f"{event['event']}: {event.get('text', '')}" for event in conversation.events[-6:]]
    return {"text": f"Message {state['count']} received.", "custom": {"count": state["count"]}}
