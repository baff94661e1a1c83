"""Building an asyncio Redis client from :class:`~convlock.config.RedisSettings`.

Shared by the lock store and the tracker store, so that both blocks of
``endpoints.yml`` reach Redis the same way: ``deployment_mode`` picks a plain
client (``standard``), a client that asks Sentinel for the current master
(``sentinel``), or a Cluster client (``cluster``); TLS, ACL credentials,
``db`` and ``socket_timeout`` mean the same in every mode.

Timeouts: ``socket_timeout`` bounds connecting as well as each read, so an
unreachable host fails in about ``socket_timeout`` instead of the operating
system's connect timeout (minutes). Callers that must never wait longer than
that, like the lock store, also wrap each call in ``asyncio.timeout``.

Retries: by default a command is re-sent once, at once, after a
*connection* error (the pool handed out a socket the server had closed). It
is never re-sent after a *timeout*, since the command may have run. Callers
whose commands are not idempotent pass ``retries=0``.

Nothing here opens a connection: clients connect on first use, so building
one never blocks and never fails because Redis is down.

Failover: a Sentinel-mode client's pool is a
:class:`~convlock.redis.failover.FailoverAwarePool`, which drops its
connections to the old master on ``+switch-master``, ``READONLY`` or
``NOREPLICAS`` instead of writing to it until a socket timeout; both stores
get this without code of their own.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.maint_notifications import MaintNotificationsConfig

from ..config import RedisSettings
from ..errors import ConfigError
from ..redact import mask_url
from .failover import FailoverAwarePool

__all__ = ["STALE_CHECK_KWARGS", "RedisClient", "create_client", "describe", "same_server"]

RedisClient = aioredis.Redis | RedisCluster
"""What :func:`create_client` returns: a standard (or Sentinel-managed) client, or a Cluster client."""



#: redis-py 8 enables RESP3 maintenance notifications ("auto") on plain
#: clients, and while they are on, its pool hands out a pooled connection
#: without checking whether the server closed it (a restart, or the server's
#: idle ``timeout``); the first call on it then fails. Default clients hide
#: that by re-sending the command, which callers with ``retries=0`` must not
#: do. Turning the notifications off restores the check, so the pool opens a
#: new connection instead.
STALE_CHECK_KWARGS: dict[str, Any] = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def _tls_kwargs(settings: RedisSettings) -> dict[str, Any]:
    if not settings.use_ssl:
        return {}
    kwargs: dict[str, Any] = {"ssl": True}
    if settings.ssl_ca_certs is not None:
        kwargs["ssl_ca_certs"] = settings.ssl_ca_certs
    if settings.ssl_certfile is not None:
        kwargs["ssl_certfile"] = settings.ssl_certfile
    if settings.ssl_keyfile is not None:
        kwargs["ssl_keyfile"] = settings.ssl_keyfile
    return kwargs


def _common_kwargs(settings: RedisSettings, retries: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "username": settings.username,
        "password": settings.password,
        # One bound for connecting and for each reply: a host that does not
        # answer is reported as down after socket_timeout, never later.
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
        "decode_responses": False,
        # A ceiling per pool (per node in a Cluster). The lock store keeps its
        # own use below it with budgets (convlock.redis.commands), so it
        # waits for a connection rather than hitting this ceiling.
        "max_connections": settings.max_connections,
    }
    kwargs.update(_tls_kwargs(settings))
    return kwargs


def create_client(
    settings: RedisSettings, *, retries: int = 1, caller_bounds_reads: bool = False
) -> RedisClient:
    """Build (without connecting) the asyncio client that ``settings`` describe.

    * ``standard``: ``url``/``port``, database ``db``.
    * ``sentinel``: asks the Sentinels in ``endpoints`` (``host:port`` each;
      ``url``/``port`` if empty) for the master of ``sentinel_service`` and
      follows failovers. Sentinels are contacted with the same TLS and
      timeout settings but without the ACL credentials, which are the data
      nodes' (Sentinel's own ``requirepass`` is a separate secret).
    * ``cluster``: discovers the cluster from ``endpoints`` (or
      ``url``/``port``). A cluster has only database 0, so ``db`` must be 0
      or left at its default.

    ``retries`` is how many times a command is re-sent after a connection
    error (never after a timeout). Responses are bytes. With
    ``caller_bounds_reads`` the sockets get no read or write timeout (the
    connect stays bounded): for a caller that bounds every call on its own
    clock, as the lock store does, which saves redis-py a task per write
    (it wraps each write in ``asyncio.wait_for`` when a socket timeout is set). Raises
    :class:`~convlock.ConfigError` for settings that cannot work together.
    """
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries!r}")
    kwargs = _common_kwargs(settings, retries)
    if caller_bounds_reads:
        kwargs["socket_timeout"] = None
    mode = settings.deployment_mode
    if mode == "standard":
        return aioredis.Redis(
            host=settings.url, port=settings.port, db=settings.db, **kwargs, **STALE_CHECK_KWARGS
        )
    if mode == "sentinel":
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": settings.socket_timeout,
            "socket_connect_timeout": settings.socket_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        sentinel_kwargs.update(_tls_kwargs(settings))
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel untyped
            settings.addresses(), sentinel_kwargs=sentinel_kwargs, **kwargs
        )
        client: aioredis.Redis = sentinel.master_for(
            settings.sentinel_service, connection_pool_class=FailoverAwarePool, db=settings.db
        )
        return client
    if mode == "cluster":
        if "db" in settings.model_fields_set and settings.db != 0:
            raise ConfigError(
                f"db: got {settings.db!r}; a Redis Cluster has only database 0, so with "
                "deployment_mode: cluster leave db out or set it to 0"
            )
        nodes = [ClusterNode(host, port) for host, port in settings.addresses()]
        return RedisCluster(
            startup_nodes=nodes,
            **kwargs,
        )
    raise ConfigError(  # pragma: no cover - the settings model allows only the three modes
        f"deployment_mode: got {mode!r}; use 'standard', 'sentinel' or 'cluster'"
    )


#: The settings that choose the server and the identity a client talks to it with.
_SERVER_FIELDS = (
    "deployment_mode",
    "url",
    "port",
    "db",
    "username",
    "password",
    "use_ssl",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_ca_certs",
    "endpoints",
    "sentinel_service",
)


def same_server(a: RedisSettings, b: RedisSettings) -> bool:
    """Whether ``a`` and ``b`` reach the same Redis (and database) as the same user.

    Compares what is configured, not where names resolve: two spellings of
    one host count as different servers, which only costs the caller a
    shared path it could have taken.
    """
    return all(getattr(a, name) == getattr(b, name) for name in _SERVER_FIELDS)


def describe(settings: RedisSettings) -> str:
    """Name the Redis that ``settings`` point at, for error messages and logs.

    For example ``"Redis at 10.0.0.5:6379 (db 1, TLS)"``, ``"Redis Sentinel
    service 'mymaster' via s1:26379, s2:26379"`` or ``"Redis Cluster via
    n1:7000, n2:7001"``. Never includes the password or the user name.
    """
    if settings.deployment_mode == "standard":
        addresses = [(settings.url, settings.port)]
    else:
        addresses = settings.addresses()
    hosts = ", ".join(f"{_host(host)}:{port}" for host, port in addresses)
    extras = []
    if settings.deployment_mode != "cluster":
        extras.append(f"db {settings.db}")
    if settings.use_ssl:
        extras.append("TLS")
    suffix = f" ({', '.join(extras)})" if extras else ""
    if settings.deployment_mode == "sentinel":
        return f"Redis Sentinel service {settings.sentinel_service!r} via {hosts}{suffix}"
    if settings.deployment_mode == "cluster":
        return f"Redis Cluster via {hosts}{suffix}"
    return f"Redis at {hosts}{suffix}"


def _host(host: str) -> str:
    # A URL pasted as the host may carry a password: mask it. An IPv6
    # address needs brackets to be told apart from its port.
    if "://" in host:
        return mask_url(host)
    return f"[{host}]" if ":" in host else host
