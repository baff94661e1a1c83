"""``GET /status``: a small HTML page for a person: locks, queues, store health, message rates.

Design: the page is built on the server from the same data as ``GET /locks``,
``/health`` and ``/metrics``, as one string of HTML. It has no JavaScript
at all: a ``<meta http-equiv="refresh">`` reloads it every
:data:`REFRESH_SECONDS`, and a ``Content-Security-Policy`` of
``default-src 'none'`` (inline styles only) means that even markup that
slipped through could not run a script or load anything.

Escaping: every value that comes from outside (conversation IDs above
all, which any client chooses, and store error messages) goes through
:func:`html.escape` with ``quote=True`` before it is placed in text or in
an attribute; links to ``/locks/{id}`` percent-encode the ID first.

Message rates are computed from the server's ``convlock_messages_total``
counters: the app keeps the samples taken by earlier renders (and one at
start-up) for up to :data:`RATE_WINDOW` seconds, and the page shows the
average rate since the oldest. So the figures cover the last minute (or
the time since start-up), per process.

Open question: with ``--workers N`` each worker renders its own rates and
metrics; the lock list is shared (it comes from the store).
"""

from __future__ import annotations

import asyncio
import html
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import quote

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__
from ..errors import LockError
from ..store import LockSnapshot
from .context import ServerContext
from .tracker import TrackerStoreUnavailable

__all__ = ["MAX_SHOWN", "OUTCOMES", "RATE_WINDOW", "REFRESH_SECONDS", "RateMeter", "render", "status"]

REFRESH_SECONDS = 5
#: At most this many conversations are shown; the page says when there are more.
MAX_SHOWN = 200
#: Rates average over at most this many seconds of samples.
RATE_WINDOW = 60.0
HEALTH_TIMEOUT = 2.0
OUTCOMES = (
    "ok", "stale", "handler_timeout", "handler_error", "lock_timeout", "unavailable", "revoked", "cancelled"
)
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


@dataclass
class RateMeter:
    """Samples of the message counters, to turn totals into per-second rates."""

    registry: CollectorRegistry
    samples: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.sample()

    def _totals(self) -> dict[str, float]:
        return {
            outcome: self.registry.get_sample_value("convlock_messages_total", {"outcome": outcome}) or 0.0
            for outcome in OUTCOMES
        }

    def sample(self) -> tuple[dict[str, float], dict[str, float], float]:
        """Take a sample; return the totals, the rates since the oldest kept sample, and its age."""
        now = time.monotonic()
        totals = self._totals()
        while len(self.samples) > 1 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()
        if self.samples:
            then, old = self.samples[0]
        else:
            then, old = now, totals
        span = now - then
        rates = {k: (totals[k] - old.get(k, 0.0)) / span if span > 0 else 0.0 for k in totals}
        self.samples.append((now, totals))
        return totals, rates, span


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _secs(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.1f}&nbsp;s"


async def _health(ctx: ServerContext) -> list[tuple[str, str, bool, str]]:
    rows = []
    for name, store, ping in (
        ("lock store", ctx.lock_store, ctx.lock_store.ping),
        ("tracker store", ctx.tracker_store, ctx.tracker_store.ping),
    ):
        backend = str(store.statistics().get("backend", type(store).__name__))
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await ping()
            rows.append((name, backend, True, ""))
        except (LockError, TrackerStoreUnavailable, ConnectionError, TimeoutError) as exc:
            rows.append((name, backend, False, str(exc) or type(exc).__name__))
    return rows


async def _locks(ctx: ServerContext) -> tuple[list[LockSnapshot], bool, str | None]:
    found: list[LockSnapshot] = []
    more = False
    iterator = ctx.lock_store.conversations()
    try:
        async for cid in iterator:
            if len(found) >= MAX_SHOWN:
                more = True
                break
            snapshot = await ctx.lock_store.inspect(cid)
            if snapshot is not None:
                found.append(snapshot)
    except LockError as exc:
        return found, more, str(exc)
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()
    found.sort(key=_most_stuck_first)
    return found, more, None


def _most_stuck_first(snapshot: LockSnapshot) -> tuple[float, str]:
    waits = [lease.waited for lease in snapshot.waiting if lease.waited is not None]
    return (-max(waits, default=0.0), snapshot.conversation_id)


@dataclass
class StatusData:
    """What one rendering of the page shows."""

    snapshots: list[LockSnapshot]
    more: bool
    lock_error: str | None
    health: list[tuple[str, str, bool, str]]
    totals: dict[str, float]
    rates: dict[str, float]
    span: float
    gauges: dict[str, float]


_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}"
    "h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}"
    "table{border-collapse:collapse}"
    "td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}"
    "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".ok{color:#176d2c;font-weight:600}.bad{color:#b3261e;font-weight:600}"
    ".cid{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;max-width:32em}"
    ".q{font-family:ui-monospace,monospace;font-size:12px;color:#555}.muted{color:#777}"
)


def render(data: StatusData) -> str:
    """The page's HTML; every outside value is escaped here (pure, for tests and reading)."""
    snapshots, more, lock_error, health = data.snapshots, data.more, data.lock_error, data.health
    totals, rates, span, gauges = data.totals, data.rates, data.span, data.gauges
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>convlock status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>convlock status</h1>",
        f'<p class="muted">convlock {_e(__version__)} &middot; {_e(generated)}'
        f" &middot; refreshes every {REFRESH_SECONDS}&nbsp;s</p>",
        "<h2>Stores</h2>",
        '<table id="health"><tr><th>store</th><th>backend</th><th>status</th><th>detail</th></tr>',
    ]
    for name, backend, ok, reason in health:
        state = '<span class="ok">ok</span>' if ok else '<span class="bad">unavailable</span>'
        out.append(f"<tr><td>{_e(name)}</td><td>{_e(backend)}</td><td>{state}</td><td>{_e(reason)}</td></tr>")
    out.append("</table>")

    out.append(f"<h2>Messages</h2><p class=\"muted\">rates over the last {span:.0f}&nbsp;s, this process</p>")
    out.append(
        '<table id="rates"><tr><th>outcome</th><th class="n">per second</th><th class="n">total</th></tr>'
    )
    for outcome in OUTCOMES:
        if totals.get(outcome) or outcome == "ok":
            out.append(
                f'<tr><td>{_e(outcome)}</td><td class="n">{rates.get(outcome, 0.0):.2f}</td>'
                f'<td class="n">{totals.get(outcome, 0.0):.0f}</td></tr>'
            )
    out.append("</table>")
    out.append(
        '<p class="muted">'
        + " &middot; ".join(f"{_e(name)}: {value:.0f}" for name, value in gauges.items())
        + "</p>"
    )

    out.append(f"<h2>Locked conversations ({len(snapshots)}{'+' if more else ''})</h2>")
    if lock_error is not None:
        out.append(f'<p class="bad" id="lock-error">cannot list locks: {_e(lock_error)}</p>')
    if not snapshots:
        out.append('<p id="no-locks">No conversation is locked.</p>')
    else:
        out.append(
            '<table id="locks"><tr><th>conversation</th><th class="n">holder ticket</th>'
            '<th class="n">lease left</th><th class="n">waiting</th><th class="n">oldest wait</th>'
            "<th>queue (ticket: waited)</th></tr>"
        )
        for snap in snapshots:
            waits = [lease.waited for lease in snap.waiting if lease.waited is not None]
            queue = ", ".join(f"{lease.ticket}: {_secs(lease.waited)}" for lease in snap.waiting) or "&ndash;"
            holder = "&ndash;" if snap.serving is None else str(snap.serving.ticket)
            left = None if snap.serving is None else snap.serving.expires_in
            oldest = max(waits) if waits else None
            href = "/locks/" + quote(snap.conversation_id, safe="")
            out.append(
                f'<tr class="lock"><td class="cid"><a href="{_e(href)}">{_e(snap.conversation_id)}</a></td>'
                f'<td class="n">{holder}</td><td class="n">{_secs(left)}</td>'
                f'<td class="n">{len(snap.waiting)}</td><td class="n">{_secs(oldest)}</td>'
                f'<td class="q">{queue}</td></tr>'
            )
        out.append("</table>")
        if more:
            out.append(f'<p class="muted">Only the first {MAX_SHOWN} are shown; see GET /locks.</p>')
    out.append("</body></html>")
    return "\n".join(out)


async def status(request: Request) -> Response:
    """The status page (HTML, no JavaScript, reloads itself)."""
    ctx: ServerContext = request.app.state.ctx
    meter: RateMeter = request.app.state.status_rates
    health, (snapshots, more, lock_error) = await asyncio.gather(_health(ctx), _locks(ctx))
    totals, rates, span = meter.sample()
    registry = ctx.metrics.registry
    gauges = {
        "messages in flight": registry.get_sample_value("convlock_messages_in_flight") or 0.0,
        "tickets waiting here": registry.get_sample_value("convlock_lock_waiting_tickets") or 0.0,
        "lock grants": registry.get_sample_value("convlock_lock_grants_total") or 0.0,
        "lock timeouts": registry.get_sample_value("convlock_lock_timeouts_total") or 0.0,
        "revocations": registry.get_sample_value("convlock_lock_revocations_total") or 0.0,
    }
    page = render(StatusData(snapshots, more, lock_error, health, totals, rates, span, gauges))
    return Response(
        page.encode("utf-8", "replace"),
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )
