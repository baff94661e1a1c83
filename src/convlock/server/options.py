"""From ``convlock run``'s options to a :class:`ServerContext`: stores, handler, checks.

Everything that can be wrong with the configuration is found here, before
the server listens, and reported as a :class:`~convlock.ConfigError` naming
the key or flag and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import load_endpoints
from ..errors import ConfigError
from ..factory import create_lock_store
from ..logs import configure_logging
from ..memory import InMemoryLockStore
from ..redact import register_secret
from .access import AccessSettings, local_bind
from .context import ServerContext
from .handlers import DEFAULT_HANDLER, load_handler
from .tracker import InMemoryTrackerStore
from .tracker_factory import create_tracker_store

__all__ = ["OPTIONS_ENV", "ServerOptions", "build_context"]

logger = logging.getLogger("convlock.server")

#: Worker processes started by uvicorn read their options from this variable.
OPTIONS_ENV = "CONVLOCK_RUN_OPTIONS"


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What ``convlock run`` was asked for, in a form that survives a trip through JSON.

    Tokens and secrets stay out of the repr.
    """

    endpoints: str | None = None
    handler: str = DEFAULT_HANDLER
    handler_timeout: float | None = 30.0
    auth_token: str | None = field(default=None, repr=False)
    workers: int = 1
    max_waiting_per_conversation: int = 100
    host: str = "127.0.0.1"
    metrics_public: bool = False
    webhook_token: str | None = field(default=None, repr=False)
    webhook_hmac_secret: str | None = field(default=None, repr=False)
    log_level: str = "info"
    log_format: str = "text"
    process_abandoned: bool = False

    def access(self) -> AccessSettings:
        """The access options these imply; registers the secrets for log redaction."""
        for secret in (self.auth_token, self.webhook_token, self.webhook_hmac_secret):
            register_secret(secret)
        return AccessSettings(
            auth_token=self.auth_token,
            webhook_token=self.webhook_token,
            webhook_hmac_secret=self.webhook_hmac_secret,
            metrics_public=self.metrics_public,
            local_bind=local_bind(self.host),
        )

    def secrets(self) -> list[str]:
        """What logs must never show: the auth token and the stores' passwords."""
        found = [s for s in (self.auth_token, self.webhook_token, self.webhook_hmac_secret) if s]
        if self.endpoints:
            try:
                config = load_endpoints(self.endpoints)
            except ConfigError:
                return found  # build_context reports the file's problem
            for block in config.values():
                if isinstance(block, dict) and isinstance(block.get("password"), str | int):
                    found.append(str(block["password"]))
        return found

    def configure_logging(self) -> None:
        """Set up this process's logging as ``--log-level``/``--log-format`` ask, secrets masked."""
        configure_logging(self.log_level, "json" if self.log_format == "json" else "text", self.secrets())

    def to_environment(self) -> str:
        """JSON for :data:`OPTIONS_ENV`."""
        return json.dumps(asdict(self))

    @classmethod
    def from_environment(cls) -> ServerOptions:
        """Read the options a parent ``convlock run`` left in :data:`OPTIONS_ENV`."""
        raw = os.environ.get(OPTIONS_ENV)
        if raw is None:
            raise ConfigError(
                f"{OPTIONS_ENV} is not set; start worker processes with 'convlock run --workers N'"
            )
        data: dict[str, Any] = json.loads(raw)
        return cls(**data)


def build_context(options: ServerOptions) -> ServerContext:
    """Build the stores and load the handler; raise ``ConfigError`` for a setup that cannot work."""
    access = options.access()  # first, so that secrets are masked in any error that follows
    config = load_endpoints(options.endpoints) if options.endpoints else {}
    handler = load_handler(options.handler)
    lock_store = create_lock_store(config.get("lock_store"))
    tracker_store = create_tracker_store(config.get("tracker_store"))
    # Stores connect lazily, so on refusal dropping them is enough.
    _check_combination(options, lock_store, tracker_store)
    ctx = ServerContext(
        lock_store=lock_store,
        tracker_store=tracker_store,
        handler=handler,
        handler_timeout=options.handler_timeout,
        auth_token=options.auth_token,
        max_waiting=options.max_waiting_per_conversation,
        access=access,
        process_abandoned=options.process_abandoned,
    )
    logger.info("%s", ctx.path.describe())
    if not ctx.message_ids:
        logger.warning(
            "tracker store %s takes no message_id in load() and save(): messages that carry a "
            "message_id or Idempotency-Key will be refused with 501",
            tracker_store.describe(),
        )
    return ctx


def _check_combination(options: ServerOptions, lock_store: object, tracker_store: object) -> None:
    if options.workers > 1 and isinstance(lock_store, InMemoryLockStore):
        raise ConfigError(
            f"--workers {options.workers}: workers are separate processes and the in-memory lock store "
            "lives in one process; set 'lock_store: {type: redis, ...}' in endpoints.yml so they share "
            "locks, or run with --workers 1"
        )
    if options.workers > 1 and isinstance(tracker_store, InMemoryTrackerStore):
        raise ConfigError(
            f"--workers {options.workers}: workers are separate processes and the in-memory tracker store "
            "lives in one process; set 'tracker_store: {type: redis, ...}' in endpoints.yml so they share "
            "conversation state, or run with --workers 1"
        )
    if isinstance(lock_store, InMemoryLockStore) and not isinstance(tracker_store, InMemoryTrackerStore):
        raise ConfigError(
            "lock_store.type: the in-memory lock store restarts its tickets at 1 with every process, "
            "while this tracker_store outlives the process, so its fencing would refuse every save after "
            "a restart; set lock_store type: redis as well"
        )
    expire_after = getattr(tracker_store, "expire_after", None)
    lifetime = getattr(lock_store, "lifetime", None)
    if isinstance(expire_after, float) and isinstance(lifetime, float) and expire_after <= 2 * lifetime:
        raise ConfigError(
            f"tracker_store.expire_after: got {expire_after:g}; it must be more than twice the lock "
            f"lifetime ({lifetime:g}s) or a conversation could expire while its message is processed"
        )
