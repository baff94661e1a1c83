"""The OpenAPI 3.0 description served at ``/openapi.json``.

Written out by hand rather than generated, so that it documents every
status an endpoint can answer with (schemathesis checks that the server
keeps to it) and stays valid OpenAPI 3.0 whatever the pydantic version.
"""

from __future__ import annotations

from typing import Any

from .validation import MAX_BODY_BYTES

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_CID = {
    "name": "conversation_id",
    "in": "path",
    "required": True,
    "description": "The conversation (sender) ID: 1 to 4096 UTF-8 bytes",
    "schema": {"type": "string", "minLength": 1},
}

_UNAVAILABLE = _error(
    "A store is unreachable, a save was not confirmed by min_replicas_acked replicas (retry with the same "
    "message_id), the lock was not granted within wait_timeout, or shutdown cancelled the message"
)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "reason"],
        "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
    },
    "WebhookRequest": {
        "type": "object",
        "required": ["sender", "message"],
        "properties": {
            "sender": {
                "type": "string",
                "minLength": 1,
                "maxLength": 1024,
                "description": "Conversation ID, at most 4096 UTF-8 bytes",
            },
            "message": {"type": "string"},
            "metadata": {"type": "object", "nullable": True, "additionalProperties": True},
            "message_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 256,
                "description": "The client's ID of this message, 1 to 256 UTF-8 bytes: a repeat of an ID the "
                "conversation remembers is answered with the stored reply and not processed again",
            },
        },
    },
    "BotResponse": {
        "type": "object",
        "required": ["recipient_id"],
        "properties": {"recipient_id": {"type": "string"}, "text": {"type": "string"}},
        "additionalProperties": True,
    },
    "Tracker": {
        "type": "object",
        "required": ["conversation_id", "events", "state", "ticket", "fence"],
        "properties": {
            "conversation_id": {"type": "string"},
            "events": {"type": "array", "items": {"type": "object", "additionalProperties": True}},
            "state": {"type": "object", "additionalProperties": True},
            "ticket": {"type": "integer", "description": "Ticket of the last applied save (0: none)"},
            "fence": {"type": "integer", "description": "Highest ticket that loaded or saved"},
            "event_count": {"type": "integer", "description": "Events stored in all (they count from 1)"},
            "after": {"type": "integer", "description": "This page holds events numbered above it"},
            "next_after": {
                "type": ["integer", "null"],
                "description": "The 'after' of the next page, or null on the last",
            },
        },
    },
    "Lease": {
        "type": "object",
        "required": ["ticket", "expires_in"],
        "properties": {
            "ticket": {"type": "integer"},
            "expires_in": {"type": "number"},
            "waited": {"type": "number", "description": "Seconds a waiting ticket has waited (waiters only)"},
        },
    },
    "LockSnapshot": {
        "type": "object",
        "required": ["conversation_id", "serving", "waiting"],
        "properties": {
            "conversation_id": {"type": "string"},
            "serving": {"allOf": [_ref("Lease")], "nullable": True},
            "waiting": {"type": "array", "items": _ref("Lease")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]}},
        "additionalProperties": True,
    },
}


#: Operations anyone may call (see convlock.server.access); every other one needs the token.
_OPEN_OPERATIONS = {("post", "/webhooks/rest/webhook"), ("get", "/health")}
_TOKEN_RESPONSES = {
    "401": _error("The --auth-token is missing or wrong (as a bearer header or ?token=)"),
    "403": _error(
        "No --auth-token is set and this route is off: a non-loopback bind, a proxied request, "
        "or a route that changes state"
    ),
}


def _guard(paths: dict[str, Any]) -> dict[str, Any]:
    """Mark every operation but the open ones as needing the token, with its 401 and 403."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            if (method, path) in _OPEN_OPERATIONS:
                continue
            operation["security"] = [{"bearerAuth": []}, {"tokenQuery": []}]
            operation["responses"] = {**operation["responses"], **_TOKEN_RESPONSES}
    return paths


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of ``convlock run``'s HTTP API."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "convlock run",
            "version": version,
            "description": "A chat message server whose replicas share per-conversation ticket locks "
            "and fenced conversation state.",
        },
        "paths": _guard({
            "/webhooks/rest/webhook": {
                "post": {
                    "operationId": "sendMessage",
                    "summary": "Process one message of a conversation and return the bot's responses",
                    "description": "Send a message_id (or an Idempotency-Key header) to make retries safe. "
                    "An 'X-Request-Timeout: <seconds>' header sets a deadline: a message still waiting "
                    "for its conversation's lock when it passes gets 504 and is never processed. "
                    "Open unless the server has --webhook-token (bearer header or ?token=) "
                    "or --webhook-hmac-secret (X-Convlock-Signature: sha256=<hex HMAC-SHA256 of the body>)",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "Same as the body's message_id (if both are sent they must agree)",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("WebhookRequest")}},
                    },
                    "responses": {
                        "200": {
                            **_json(
                                {"type": "array", "items": _ref("BotResponse")},
                                "The handler's responses, or for a repeated message_id the stored ones",
                            ),
                            "headers": {
                                "Idempotent-Replayed": {
                                    "description": "'true' when the reply is the stored one of a repeat",
                                    "schema": {"type": "string", "enum": ["true"]},
                                }
                            },
                        },
                        "400": _error("The body is not valid JSON, or the client left before it ended"),
                        "401": _error("The webhook token or signature is missing or wrong (when configured)"),
                        "409": _error(
                            "This message's lock lease lapsed and a newer holder took over; nothing saved"
                        ),
                        "413": _error(f"The body is over {MAX_BODY_BYTES} bytes"),
                        "422": _error("A field is missing or has the wrong type or size"),
                        "429": _error(
                            "Too many messages of this conversation wait on this server "
                            "(--max-waiting-per-conversation); nothing stored, retry after Retry-After"
                        ),
                        "499": _error(
                            "The client disconnected before the lock was granted; not processed "
                            "(sent to nobody, for the access log)"
                        ),
                        "500": _error("The handler raised; state unchanged"),
                        "501": _error("A message_id was sent but the tracker store cannot remember IDs"),
                        "503": _UNAVAILABLE,
                        "504": _error(
                            "The handler ran past --handler-timeout, or the X-Request-Timeout deadline "
                            "passed before the lock was granted; state unchanged"
                        ),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Ping the lock and tracker stores (per-store details for token holders only)",
                    "responses": {
                        "200": _json(_ref("Health"), "Both stores answer"),
                        "503": _json(_ref("Health"), "A store does not answer"),
                    },
                }
            },
            "/conversations/{conversation_id}/tracker": {
                "get": {
                    "operationId": "getTracker",
                    "summary": "One page of the conversation's events, with its state and tickets",
                    "parameters": [
                        _CID,
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "description": "Return events numbered above this (events count from 1)",
                            "schema": {"type": "integer", "minimum": 0, "default": 0},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "description": "Most events in the page",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("Tracker"), "The stored conversation (empty if never saved)"),
                        "422": _error(
                            "The conversation ID is too long or not UTF-8 once %-decoded, or after/limit "
                            "is out of range"
                        ),
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/locks": {
                "get": {
                    "operationId": "listLocks",
                    "summary": "Snapshots of every locked conversation",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["locks", "truncated"],
                                "properties": {
                                    "locks": {"type": "array", "items": _ref("LockSnapshot")},
                                    "truncated": {"type": "boolean"},
                                },
                            },
                            "The locks held or waited for now",
                        ),
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/locks/{conversation_id}": {
                "get": {
                    "operationId": "getLock",
                    "summary": "One conversation's lock queue",
                    "parameters": [_CID],
                    "responses": {
                        "200": _json(_ref("LockSnapshot"), "The queue; serving is null when unlocked"),
                        "422": _error("The conversation ID is too long, or not UTF-8 once %-decoded"),
                        "503": _UNAVAILABLE,
                    },
                },
                "delete": {
                    "operationId": "forceRelease",
                    "summary": "Revoke the holder and serve the next ticket (needs --auth-token)",
                    "parameters": [
                        _CID,
                        {
                            "name": "token",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "The auth token, if not given as a bearer header",
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["conversation_id", "revoked_ticket"],
                                "properties": {
                                    "conversation_id": {"type": "string"},
                                    "revoked_ticket": {"type": "integer", "nullable": True},
                                },
                            },
                            "The revoked ticket, or null if nothing was held",
                        ),
                        "422": _error("The conversation ID is too long, or not UTF-8 once %-decoded"),
                        "503": _UNAVAILABLE,
                    },
                },
            },
            "/status": {
                "get": {
                    "operationId": "status",
                    "summary": "HTML status page: locked conversations, queues, store health, message rates",
                    "responses": {
                        "200": {
                            "description": "An HTML page that reloads itself every few seconds",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        }),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "tokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }
