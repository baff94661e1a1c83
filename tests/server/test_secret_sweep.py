"""The secret and message-text sweep: nothing sensitive in any output of a server run gone wrong.

A server runs on a password-protected Redis, with an auth token and a
webhook token, each a recognisable string, and receives messages carrying
a recognisable text. Errors are provoked: a handler that quotes the text in
its exception, one that returns a result that is not JSON, bad requests
that carry the text, wrong tokens, the token sent as ``?token=`` (which
uvicorn's access log would print), and Redis going down. Every byte the
server wrote (its whole log) and every reply that is not the owner's own
successful read must then be free of the secrets; at the ``info`` level the
log must not hold the text either. A configuration error and the reprs of
the settings objects are swept too.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest
from server_procs import ServerProcess, start_server, write_endpoints

import redis_procs
from convlock.config import LockStoreSettings, parse_settings
from convlock.redact import mask_url, redact
from convlock.server.access import AccessSettings
from convlock.server.options import ServerOptions
from redis_procs import RedisProcess

WEBHOOK = "/webhooks/rest/webhook"
SUFFIX = uuid.uuid4().hex[:10]
REDIS_PASSWORD = f"redis-pw-SWEEP{SUFFIX}"
AUTH_TOKEN = f"auth-token-SWEEP{SUFFIX}"
WEBHOOK_TOKEN = f"webhook-token-SWEEP{SUFFIX}"
SECRETS = (REDIS_PASSWORD, AUTH_TOKEN, WEBHOOK_TOKEN)
TEXT = f"my card is 4111-TEXT{SUFFIX}"


def assert_clean(output: str, where: str, *, text_too: bool = True) -> None:
    """No secret (and, with ``text_too``, no message text) anywhere in ``output``."""
    for secret in SECRETS:
        assert secret not in output, f"a secret leaked into {where}:\n{output[-4000:]}"
    if text_too:
        assert f"TEXT{SUFFIX}" not in output, f"the message text leaked into {where}:\n{output[-4000:]}"


def endpoints(tmp_path: Path, redis: RedisProcess) -> Path:
    block = {"type": "redis", "url": "127.0.0.1", "port": redis.port, "db": 0,
             "password": "${SWEEP_REDIS_PASSWORD}", "socket_timeout": 2}
    return write_endpoints(tmp_path / "endpoints.yml", {
        "lock_store": {**block, "lifetime": 5, "wait_timeout": 3},
        "tracker_store": block,
    })


def provoke(server: ServerProcess, redis: RedisProcess) -> list[str]:
    """Run the misbehaviours against ``server``; return every reply an outsider or a failure got."""
    replies: list[str] = []
    admin = {"Authorization": f"Bearer {AUTH_TOKEN}"}
    channel = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}

    def keep(response: httpx.Response) -> httpx.Response:
        replies.append(f"{response.status_code} {response.headers} {response.text}")
        return response

    with httpx.Client(base_url=server.url, timeout=30) as http:
        ok = http.post(WEBHOOK, json={"sender": "sweep", "message": TEXT}, headers=channel)
        assert ok.status_code == 200, ok.text  # the sender's own answer may echo its text
        assert keep(http.post(WEBHOOK, json={"sender": "sweep", "message": f"ctl:leak:{TEXT}"},
                              headers=channel)).status_code == 500
        assert keep(http.post(WEBHOOK, json={"sender": "sweep", "message": f"ctl:unjson:{TEXT}"},
                              headers=channel)).status_code == 500
        # Bad requests that carry the text.
        assert keep(http.post(WEBHOOK, json={"sender": "sweep", "message": TEXT})).status_code == 401
        assert keep(http.post(WEBHOOK, headers=channel,
                              json={"sender": "sweep", "message": 42, "metadata": TEXT})).status_code == 422
        assert keep(http.post(WEBHOOK, headers=channel,
                              content=f'{{"sender": "sweep", "message": "{TEXT}"'.encode())).status_code == 400
        assert keep(http.post(WEBHOOK, headers=channel,
                              json={"sender": TEXT * 200, "message": "x"})).status_code == 422
        # Wrong and missing tokens; the right token as ?token= (which an access log would print).
        assert keep(http.get("/conversations/sweep/tracker")).status_code == 401
        assert keep(http.get("/locks", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert http.get("/conversations/sweep/tracker", params={"token": AUTH_TOKEN}).status_code == 200
        assert keep(http.get("/locks", params={"token": AUTH_TOKEN})).status_code == 200
        assert keep(http.get("/health", headers=admin)).status_code == 200
        assert keep(http.get("/metrics", headers=admin)).status_code == 200
        assert keep(http.get("/openapi.json", headers=admin)).status_code == 200
        # Redis goes down.
        redis.kill()
        assert keep(http.post(WEBHOOK, json={"sender": "sweep", "message": TEXT},
                              headers=channel)).status_code == 503
        assert keep(http.get("/health", headers=admin)).status_code == 503
        assert keep(http.get("/health")).status_code == 503
        assert keep(http.get("/locks", headers=admin)).status_code == 503
        assert keep(http.get("/conversations/sweep/tracker", headers=admin)).status_code == 503
        assert keep(http.get("/locks/sweep", headers=admin)).status_code == 503
        assert keep(http.delete("/locks/sweep", headers=admin)).status_code == 503
        keep(http.get("/metrics", headers=admin))
    return replies


@pytest.mark.parametrize("log_level", ["info", "debug"])
def test_no_secret_or_message_text_in_any_output(tmp_path: Path, log_level: str) -> None:
    redis = redis_procs.start_redis(tmp_path, password=REDIS_PASSWORD)
    try:
        server = start_server(
            tmp_path, "--auth-token", AUTH_TOKEN, "--webhook-token", WEBHOOK_TOKEN,
            endpoints=endpoints(tmp_path, redis), handler="convlock_test_handlers:control",
            env={"SWEEP_REDIS_PASSWORD": REDIS_PASSWORD}, log_level=log_level,
        )
        try:
            replies = provoke(server, redis)
        finally:
            server.stop()
    finally:
        redis.kill()
    log = server.log()
    # The run did what we meant: handler failures and the outage are in the log.
    assert "handler failed for conversation 'sweep'" in log, log
    assert "ValueError" in log, log
    assert "TypeError" in log, log
    assert re.search(r"incident [0-9a-f]{12}", log), log
    for reply in replies:
        assert_clean(reply, "a reply")
    if log_level == "info":
        assert_clean(log, "the info log")
    else:
        # Debug may hold the text (the full exceptions), never a secret: the access
        # log's "?token=..." is masked.
        assert_clean(log, "the debug log", text_too=False)
        assert "token=***" in log, log
        assert f"TEXT{SUFFIX}" in log, "debug keeps the full exception for the operator"


def test_a_config_error_does_not_quote_the_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convlock.cli import main

    path = write_endpoints(tmp_path / "endpoints.yml", {
        "lock_store": {"type": "redis", "password": [REDIS_PASSWORD], "port": "not-a-port",
                       "pasword": REDIS_PASSWORD},
    })
    assert main(["run", "--endpoints", str(path), "--auth-token", AUTH_TOKEN]) == 2
    captured = capsys.readouterr()
    assert "lock_store.password: got ***" in captured.err, captured.err
    assert "lock_store.port" in captured.err
    assert_clean(captured.out + captured.err, "the config error")


def test_settings_and_options_keep_secrets_out_of_their_reprs() -> None:
    settings = parse_settings(
        LockStoreSettings,
        {"type": "redis", "password": REDIS_PASSWORD, "pasword": REDIS_PASSWORD},
        section="lock_store",
    )
    assert settings.password == REDIS_PASSWORD
    options = ServerOptions(auth_token=AUTH_TOKEN, webhook_token=WEBHOOK_TOKEN, webhook_hmac_secret=AUTH_TOKEN)
    access = AccessSettings(auth_token=AUTH_TOKEN, webhook_token=WEBHOOK_TOKEN)
    for value in (settings, options, access):
        assert_clean(repr(value), f"repr of {type(value).__name__}")
        assert_clean(str(value), f"str of {type(value).__name__}")


def test_redact_masks_registered_secrets_url_passwords_and_token_parameters() -> None:
    from convlock.redact import register_secret

    register_secret(REDIS_PASSWORD)
    assert redact(f"AUTH failed with {REDIS_PASSWORD}!") == "AUTH failed with ***!"
    assert mask_url("rediss://user:pa55@host:6380/0") == "rediss://user:***@host:6380/0"
    assert mask_url("redis://:pa55@host") == "redis://:***@host"
    assert mask_url("redis://host:6379") == "redis://host:6379", "a port is not a password"
    assert redact("GET /locks?token=abc&x=1 HTTP/1.1") == "GET /locks?token=***&x=1 HTTP/1.1"
    register_secret("ab")  # too short to mask in free text
    assert redact("tab") == "tab"
