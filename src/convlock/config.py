"""Reading ``endpoints.yml``: ``${VAR}`` interpolation and the store settings models.

The ``lock_store:`` block keeps the spec's keys and defaults exactly (``type``,
``url``, ``port``, ``db``, ``password``, ``use_ssl``), so files written for the
spec's framework work unchanged. convlock adds keys for what that framework
lacked (TLS files, ACL users, Sentinel, Cluster, timeouts, lease length).

Validation is pydantic's, in lax mode, because values that come through
``${VAR}`` interpolation are strings: ``port: "6379"`` must mean 6379. Its
errors are rewritten into one message per key that names the key, the value
found and what is allowed. Unknown keys are accepted with a warning, so a
typo does not take a server down but is still seen.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .redact import MASK, mask_url, register_secret

__all__ = [
    "LockStoreSettings",
    "RedisSettings",
    "StoreSettings",
    "load_endpoints",
    "parse_settings",
]

logger = logging.getLogger("convlock.config")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, *, where: str = "") -> Any:
    """Replace ``${VAR}`` (or ``${VAR:-default}``) in every string of ``value``.

    Interpolation happens after YAML parsing, inside string scalars only, so
    an environment value can never change the structure of the file. An
    unset variable without a default is a :class:`ConfigError` naming it.
    """
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is not None:
                return found
            if default is not None:
                return default
            raise ConfigError(
                f"{where or 'endpoints.yml'}: environment variable {name} is not set; "
                f"export {name}=... or write ${{{name}:-default}} to give a default"
            )

        return _VAR.sub(substitute, value)
    if isinstance(value, Mapping):
        return {
            key: interpolate(item, where=f"{where}.{key}" if where else str(key))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [interpolate(item, where=f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def load_endpoints(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an ``endpoints.yml`` file and return it as a plain dict, interpolated.

    ``create_lock_store(load_endpoints(path).get("lock_store"))`` builds the
    configured store. A missing or malformed file is a :class:`ConfigError`
    that names the file; an empty file is an empty dict.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"endpoints file {str(file)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read endpoints file {str(file)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"endpoints file {str(file)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"endpoints file {str(file)!r} must be a mapping of sections such as "
            f"'lock_store:', got a {type(data).__name__}"
        )
    result: dict[str, Any] = interpolate(data)
    return result


def _none_if_blank(value: Any) -> Any:
    # An interpolated "${REDIS_PASSWORD:-}" arrives as "": mean "not set".
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


OptionalText = Annotated[str | None, BeforeValidator(_none_if_blank)]
OptionalSeconds = Annotated[float | None, BeforeValidator(_none_if_blank), Field(gt=0, allow_inf_nan=False)]


class _Settings(BaseModel):
    """Common behaviour: lax conversion, unknown keys kept for a warning."""

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        coerce_numbers_to_str=True,
        str_strip_whitespace=True,
        frozen=True,
    )

    type: str = "in_memory"

    def __repr_args__(self) -> Any:
        # An unknown key may be a misspelt "password": show that it is there, never its value.
        extra = self.model_extra or {}
        for name, value in super().__repr_args__():
            yield name, (MASK if name in extra else value)

    def unknown_keys(self) -> list[str]:
        """The keys that no field claimed, in file order."""
        return list(self.model_extra or {})


_SettingsT = TypeVar("_SettingsT", bound=_Settings)


class RedisSettings(_Settings):
    """How to reach Redis: the spec's keys, plus TLS, ACL, Sentinel and Cluster.

    Shared by ``lock_store:`` and ``tracker_store:`` so that both blocks take
    the same keys with the same meaning.
    """

    url: str = Field(default="localhost", validation_alias="host", min_length=1)
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=1, ge=0)
    #: Kept out of reprs and registered for log redaction (see convlock.redact).
    password: OptionalText = Field(default=None, repr=False)
    username: OptionalText = None
    use_ssl: bool = False
    ssl_keyfile: OptionalText = None
    ssl_certfile: OptionalText = None
    ssl_ca_certs: OptionalText = None
    key_prefix: str = Field(default="convlock", min_length=1, max_length=256)
    socket_timeout: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    #: Connections one store opens to one Redis server, at most, whatever the
    #: number of waiting calls (see convlock.redis.commands and .wakeups).
    max_connections: int = Field(default=50, ge=2, le=10_000)
    deployment_mode: Literal["standard", "sentinel", "cluster"] = "standard"
    endpoints: list[str] = Field(default_factory=list)
    sentinel_service: str = Field(default="mymaster", min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _url_or_host(cls, data: Any) -> Any:
        # The spec calls the host "url"; "host" is accepted as an alias. Both
        # at once would be ambiguous, so that is an error rather than a guess.
        if isinstance(data, Mapping) and "url" in data and "host" in data:
            raise ValueError("give either 'url' or its alias 'host', not both")
        if isinstance(data, Mapping) and "url" in data:
            data = {("host" if key == "url" else key): value for key, value in data.items()}
        return data

    @field_validator("password")
    @classmethod
    def _remember_password(cls, value: str | None) -> str | None:
        register_secret(value)
        return value

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):  # "h1:26379,h2:26379" from one ${VAR}
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str]) -> list[str]:
        for item in value:
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"each endpoint must look like 'host:port', got {item!r}")
        return value

    @field_validator("url")
    @classmethod
    def _check_host(cls, value: str) -> str:
        # A URL here would carry its password into every message that names the host.
        if "://" in value or "@" in value:
            raise ValueError(
                "url is the host name alone (as in the spec), not a URL; write e.g. 'redis.internal' and "
                "give the password with the password key"
            )
        return value

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        # Braces would change the Cluster hash slot of every key.
        if "{" in value or "}" in value or any(ch.isspace() for ch in value):
            raise ValueError("key_prefix may not contain braces or white space")
        return value

    @field_validator("ssl_keyfile", "ssl_certfile", "ssl_ca_certs")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError("no such file; give the path of a PEM file readable by the server")
        return value

    def addresses(self) -> list[tuple[str, int]]:
        """The ``endpoints`` as (host, port) pairs, or ``[(url, port)]`` if none."""
        if not self.endpoints:
            return [(self.url, self.port)]
        pairs = []
        for item in self.endpoints:
            host, _, port = item.rpartition(":")
            pairs.append((host.strip("[]"), int(port)))
        return pairs


class StoreSettings(RedisSettings):
    """What every store block shares: ``type`` plus the Redis connection keys.

    ``type`` names a built-in store (``in_memory``, the default, or
    ``redis``); a dotted class path never reaches this model (the factory
    builds such classes from the raw keys).
    """

    @field_validator("type", mode="before")
    @classmethod
    def _check_type(cls, value: Any) -> Any:
        if value is None:
            return "in_memory"
        if not isinstance(value, str) or not value.strip():
            raise ValueError("type must be 'in_memory', 'redis' or the dotted path of a store class")
        return value


class LockStoreSettings(StoreSettings):
    """The whole ``lock_store:`` block.

    ``type`` is ``in_memory`` (the default), ``redis``, or the dotted path of
    a ``LockStore`` subclass. ``lifetime`` and ``wait_timeout`` set the
    store's defaults for ``lock()``.
    """

    lifetime: OptionalSeconds = None
    wait_timeout: OptionalSeconds = None


#: Keys whose values are never quoted back in an error message.
SECRET_KEYS = frozenset({"password", "username", "token", "secret", "auth_token", "sentinel_password"})


def describe(value: Any, *, key: str = "") -> str:
    """A short, safe rendering of a config value for an error message (secrets masked)."""
    if key.rsplit(".", 1)[-1] in SECRET_KEYS:
        return MASK
    text = mask_url(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def parse_settings(model: type[_SettingsT], config: Mapping[str, Any], *, section: str) -> _SettingsT:
    """Validate a config block with ``model``; raise ``ConfigError`` naming each bad key.

    Unknown keys are logged as warnings, one per key.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys, got {type(config).__name__}")
    try:
        settings = model.model_validate(dict(config))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = ".".join(str(part) for part in error["loc"])
            loc = "url" if loc == "host" and "url" in config else loc
            key = f"{section}.{loc}" if loc else section
            message = error["msg"].removeprefix("Value error, ")
            if loc and "input" in error and error["type"] != "missing":
                shown = describe(error["input"], key=loc)
                problems.append(f"{key}: got {shown}; {message[:1].lower()}{message[1:]}")
            else:
                problems.append(f"{key}: {message}")
        raise ConfigError(
            f"invalid {section} configuration: " + "; ".join(problems) + ". Fix these keys in endpoints.yml."
        ) from None
    for key in settings.unknown_keys():
        logger.warning("%s: unknown key %r is ignored; check its spelling", section, key)
    return settings

