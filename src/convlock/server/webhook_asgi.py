"""``POST /webhooks/rest/webhook`` answered in raw ASGI, in front of the Starlette app.

Nearly every request a chat server gets is a message to this one route. On
its way through Starlette it passed eight layers before the endpoint ran:
``Starlette.__call__``, ``ServerErrorMiddleware``, the app's metrics and
access middlewares, ``ExceptionMiddleware``, the router and its route match,
``request_response`` and a ``Request``; the reply went back through a
``Response`` object and four ``send`` wrappers. :class:`WebhookFastPath`
serves the same request with none of them: one function reads the headers
once, calls :func:`~.channel.answer_webhook` (the same function the
Starlette endpoint calls) and writes the answer as two raw ASGI messages.
Measured with the bench's 16 conversations in memory (server CPU per
message from /proc, runs interleaved with the previous code): 398 -> 367 us
on a quiet machine (medians of three), 465 -> 395 us on a busy one (four);
``convlock bench`` scenario 7 went from 0.39 of the bare echo's rate to
0.49-0.57 together with :mod:`.deadlines`.

What it promises: the same answer as the Starlette route, byte for byte,
for every request it takes (``tests/server/test_webhook_asgi.py`` compares
the two over HTTP):

* access: ``--webhook-token`` and ``--webhook-hmac-secret`` are checked by
  :func:`~.access.admit_webhook`, the access middleware's own code;
* statuses and JSON error bodies: each :class:`~.responses.ApiError` is
  answered with its own response; an exception nothing turned into one is
  logged and answered 500 as the app's handler does, then re-raised, as
  Starlette's ``ServerErrorMiddleware`` does, so that uvicorn logs it too;
* headers: the Starlette route's, in its order (``Server-Timing``,
  ``Idempotent-Replayed`` on a replay, ``Content-Length``, ``Content-Type``),
  then ``X-Content-Type-Options: nosniff`` as the access middleware adds it;
* metrics: ``convlock_http_requests_total`` and the request histogram under
  ``POST /webhooks/rest/webhook``, with status 500 when nothing was sent (as
  the metrics middleware counts it);
* deadlines (504), client disconnects (499), back-pressure (429) and the
  rest of the message's outcomes are :func:`~.channel.process_message`'s,
  shared with the Starlette endpoint.

Writes: a 200 is written at the end of the event-loop iteration in which
its message finished (the task steps aside once, ``asyncio.sleep(0)``,
before its first ``send``), as Redis writes its replies before it sleeps
and as :mod:`convlock.redis.commands` batches its commands: the messages
that became ready together finish together, and their answers go out
back to back. Without it, a message that needs no Redis (the in-memory
stores) ran from its request to its answer in one step. Measured with the
bench's 16 conversations in memory (server CPU per message and
messages/s, interleaved A/B of two replicas, two runs each, together with
the grant that no longer steps aside in
:func:`~.channel._disconnect_check`): 92.2 -> 84.7 and 97.0 -> 85.6 us,
10,696 -> 11,682 and 10,221 -> 11,552 messages/s. Either change alone
measured worse than both: the grant without its step alone made the
server slower (105 -> 108 us), the step before the write alone faster
(98.7 -> 90.4 us). Our reading, not measured directly: a client that
multiplexes many connections (a load balancer, a channel connector, the
bench's client) reads answers that go out together in one wake-up and
sends the next requests together, which the server then reads in one pass
of its loop. On Redis, where each message already waits for two round
trips, the change was within the noise (7,226 -> 7,412 messages/s). The
cost is one pass through the event loop per message: microseconds of
latency when the server is idle.

What it takes: exactly ``POST`` on the path ``/webhooks/rest/webhook`` with
no ``root_path``. Every other request, including other methods on this
path (405) and anything a mounted ``root_path`` would make the router match
differently, goes to the Starlette app unchanged.
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .access import NOSNIFF, WEBHOOK_PATH, admit_webhook, with_nosniff
from .channel import answer_webhook
from .context import ServerContext
from .responses import ApiError, unexpected_error_response

__all__ = ["WebhookFastPath"]

_JSON = b"application/json"


class WebhookFastPath:
    """Answers ``POST /webhooks/rest/webhook`` for one :class:`ServerContext` (see the module docstring)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    @staticmethod
    def serves(scope: Scope) -> bool:
        """Whether this request is one the fast path answers (else the Starlette app does)."""
        return (
            scope["type"] == "http"
            and scope["path"] == WEBHOOK_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500  # what the metrics middleware counts when nothing was sent
        try:
            status = await self._answer(scope, receive, send)
        finally:
            self.ctx.metrics.observe_request("POST", WEBHOOK_PATH, status, time.perf_counter() - start)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer the request; the status sent (500 if nothing was)."""
        ctx = self.ctx
        access = ctx.access
        if access.webhook_token is not None or access.webhook_hmac_secret is not None:
            admitted, refusal = await admit_webhook(access, scope, receive)
            if refusal is not None:
                return await _send_response(send, refusal)
            if admitted is None:
                return 500  # the client left while its body was read; nothing to send
            receive = admitted
        try:
            body, extra = await answer_webhook(ctx, scope, receive)
        except ApiError as exc:
            return await _send_response(send, exc.response())
        except Exception as exc:
            await _send_response(send, unexpected_error_response("POST", scope["path"], exc))
            raise
        headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in extra.items()]
        headers += ((b"content-length", b"%d" % len(body)), (b"content-type", _JSON), NOSNIFF)
        # Write at the end of this event-loop iteration (see "Writes" in the module docstring).
        await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return 200


async def _send_response(send: Send, response: Response) -> int:
    """Send a Starlette ``response`` (an error, its body set) as the access middleware would; its status."""
    headers = with_nosniff(response.raw_headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
    return response.status_code
