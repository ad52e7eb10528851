"""The OpenAPI description, completed: auth, every route's problem+json statuses, the shape of a
new message by role, and links between operations (which schemathesis follows statefully).

FastAPI derives most of the document from the routes; what it cannot see (auth read from a
header by hand, errors raised as exceptions, rules a validator enforces) is added here, once.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import limits
from service.config import Settings
from service.schemas import CONVERSATION_ID, ExportHeader, Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_STATUS_MEANINGS = {
    400: "Malformed JSON, or the gateway refused the request as malformed",
    401: "No key, or a wrong one; an end-user token that is bad, expired or too long-lived",
    403: "An end-user token used outside its conversations, scope or caps; or the gateway "
    "refused the key",
    404: "No such conversation for this tenant (or, from the gateway, no such model); no "
    "detached turn to stream",
    408: "The headers or body did not arrive in time",
    409: "The conversation stayed busy past LOCK_WAIT_SECONDS, or the same idempotent request "
    "is still running; no running detached turn to cancel; a seq past the log's end; a page "
    "of a log rewritten since (`generation`); a fork or import onto a conversation that exists",
    413: "The body is over MAX_BODY_BYTES, or the new messages exceed the token budget",
    415: "The body is not JSON",
    422: "A bad id, field, type or limit, or an Idempotency-Key reused with another body",
    429: "TENANT_RATE or END_USER_RATE (with Retry-After and RateLimit-* headers), or the "
    "gateway's rate limit after retries",
    502: "The gateway failed or answered something that is not a completion",
    503: "Redis unreachable, or MAX_CONCURRENCY requests in flight",
    504: "The gateway did not answer within GATEWAY_TIMEOUT_SECONDS",
}
_CONVERSATION = [401, 403, 404, 422, 429, 503]
_ERRORS: dict[tuple[str, str], list[int]] = {
    ("post", "/conversations/{conversation_id}/messages"): sorted(_STATUS_MEANINGS),
    ("get", "/conversations/{conversation_id}/messages"): [*_CONVERSATION, 409],
    ("post", "/conversations/{conversation_id}/regenerate"): sorted(_STATUS_MEANINGS),
    ("post", "/conversations/{conversation_id}/fork"): [
        400,
        401,
        403,
        404,
        408,
        409,
        413,
        415,
        422,
        429,
        503,
    ],
    ("delete", "/conversations/{conversation_id}/messages"): [401, 403, 404, 409, 422, 429, 503],
    ("get", "/conversations/{conversation_id}/export"): _CONVERSATION,
    ("post", "/conversations/{conversation_id}/import"): [
        400,
        401,
        403,
        408,
        409,
        413,
        415,
        422,
        429,
        503,
    ],
    # A preview calls no gateway and takes no lease: a turn's errors before either.
    ("post", "/conversations/{conversation_id}/context"): [
        400,
        401,
        403,
        408,
        413,
        415,
        422,
        429,
        503,
    ],
    ("get", "/conversations/{conversation_id}"): _CONVERSATION,
    ("put", "/conversations/{conversation_id}"): [400, 401, 403, 408, 413, 415, 422, 429, 503],
    ("delete", "/conversations/{conversation_id}"): [401, 403, 404, 409, 422, 429, 503],
    ("get", "/conversations"): [401, 403, 422, 429, 503],
    ("post", "/end-user-tokens"): [400, 401, 403, 408, 413, 415, 422, 429, 503],
    ("get", "/conversations/{conversation_id}/stream"): _CONVERSATION,
    ("post", "/conversations/{conversation_id}/cancel"): [401, 403, 409, 422, 429, 503],
    ("get", "/readyz"): [503],
    ("post", "/v1/chat/completions"): sorted(_STATUS_MEANINGS),
    ("get", "/v1/models"): [401, 403, 429, 502, 503],
}
_SAME_ID = {"conversation_id": "$request.path.conversation_id"}
# operationId of the target -> link name; every write to a conversation leads to its reads.
_READS = {
    "GetConversation": "get_conversation",
    "GetMessages": "get_messages",
    "DeleteConversation": "delete_conversation",
}
_LINKS: dict[tuple[str, str, str], dict[str, str]] = {
    ("put", "/conversations/{conversation_id}", "201"): _READS,
    ("put", "/conversations/{conversation_id}", "200"): _READS,
    ("post", "/conversations/{conversation_id}/messages", "200"): _READS,
    ("delete", "/conversations/{conversation_id}", "204"): {
        "GetConversation": "get_conversation",
        "GetMessages": "get_messages",
    },
}
_OPERATION_IDS = {
    ("post", "/conversations/{conversation_id}/messages"): "PostTurn",
    ("get", "/conversations/{conversation_id}/messages"): "GetMessages",
    ("get", "/conversations/{conversation_id}"): "GetConversation",
    ("put", "/conversations/{conversation_id}"): "PutConversation",
    ("delete", "/conversations/{conversation_id}"): "DeleteConversation",
    ("get", "/conversations"): "ListConversations",
    ("post", "/end-user-tokens"): "MintEndUserToken",
    ("get", "/conversations/{conversation_id}/stream"): "FollowTurn",
    ("post", "/conversations/{conversation_id}/cancel"): "CancelTurn",
    ("post", "/conversations/{conversation_id}/regenerate"): "Regenerate",
    ("post", "/conversations/{conversation_id}/fork"): "ForkConversation",
    ("delete", "/conversations/{conversation_id}/messages"): "TruncateMessages",
    ("get", "/conversations/{conversation_id}/export"): "ExportConversation",
    ("post", "/conversations/{conversation_id}/import"): "ImportConversation",
    ("post", "/v1/chat/completions"): "CreateChatCompletion",
    ("get", "/v1/models"): "ListModels",
}
OPENAI_ERROR = {
    "title": "OpenAIError",
    "description": "Every error under /v1/ (OpenAI's shape), with the status our own routes give",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code", "param"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}


def _text_or_parts(nullable: bool = False) -> dict[str, Any]:
    options: list[dict[str, Any]] = [
        {"type": "string"},
        {
            "type": "array",
            "items": {"$ref": "#/components/schemas/ContentPart"},
            "maxItems": limits.MAX_CONTENT_PARTS,
        },
    ]
    if nullable:
        options.append({"type": "null"})
    return {"anyOf": options}


def _message_schema() -> dict[str, Any]:
    """A new message, one shape per role: what MessageCreate's validator enforces."""
    common: dict[str, Any] = {
        "name": {
            "anyOf": [{"type": "string", "maxLength": limits.MAX_TEXT_CHARS}, {"type": "null"}]
        },
        "cache_control": {"anyOf": [{"type": "object"}, {"type": "null"}]},
    }
    user = {
        "type": "object",
        "properties": {"role": {"const": "user"}, "content": _text_or_parts(), **common},
        "required": ["role", "content"],
        "additionalProperties": False,
    }
    tool = {
        "type": "object",
        "properties": {
            "role": {"const": "tool"},
            "content": _text_or_parts(),
            "tool_call_id": {"type": "string", "minLength": 1, "maxLength": 256},
            **common,
        },
        "required": ["role", "content", "tool_call_id"],
        "additionalProperties": False,
    }
    calls = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/ToolCall"},
        "maxItems": limits.MAX_TOOL_CALLS,
    }
    assistant = {
        "type": "object",
        "properties": {
            "role": {"const": "assistant"},
            "content": _text_or_parts(nullable=True),
            "tool_calls": {"anyOf": [calls, {"type": "null"}]},
            **common,
        },
        "required": ["role"],
        "additionalProperties": False,
        # Something to say: content, or at least one tool call.
        "anyOf": [
            {"required": ["content"], "properties": {"content": _text_or_parts()}},
            {"required": ["tool_calls"], "properties": {"tool_calls": {**calls, "minItems": 1}}},
        ],
    }
    return {
        "title": "MessageCreate",
        "description": "A new message: user, assistant or tool (with tool_call_id).",
        "oneOf": [user, assistant, tool],
    }


def _import_lines(message: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """An import's body as JSON Lines: the conversation line, then message lines (`seq` their
    position, which a schema cannot say; service/editing.py checks it)."""
    header = ExportHeader.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in header.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas["ExportHeader"] = header
    extra = {
        "type": {"const": "message"},
        "seq": {"type": "integer", "minimum": 1, "maximum": 2**53},
        "created_at": {"type": "string", "format": "date-time"},
    }
    schemas["ExportMessage"] = {
        "title": "ExportMessage",
        "oneOf": [
            {
                **shape,
                "properties": {**shape["properties"], **extra},
                "required": [*shape["required"], "type", "seq"],
            }
            for shape in message["oneOf"]
        ],
    }
    return {
        "type": "array",
        # No maxItems: the limit (MAX_IMPORT_MESSAGES, and MAX_BODY_BYTES) is told in words, so
        # that generators do not build files of ten thousand messages to probe it.
        "description": "One JSON value per line: the conversation, then at most "
        f"{limits.MAX_IMPORT_MESSAGES} messages (and at most MAX_BODY_BYTES in all)",
        "prefixItems": [{"$ref": "#/components/schemas/ExportHeader"}],
        "items": {"$ref": "#/components/schemas/ExportMessage"},
        "minItems": 1,
    }


def _openai_messages(schemas: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI request's message, one shape per role: ours (without `cache_control`), plus
    `system` / `developer` (the system prompt) and an assistant's echoed `refusal`."""
    ours = schemas["MessageCreate"]["oneOf"]
    user, assistant, tool = (
        {
            **shape,
            "properties": {k: v for k, v in shape["properties"].items() if k != "cache_control"},
        }
        for shape in ours
    )
    assistant["properties"]["refusal"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    system = [
        {
            "type": "object",
            "properties": {
                "role": {"const": role},
                "content": _text_or_parts(),
                "name": user["properties"]["name"],
            },
            "required": ["role", "content"],
            "additionalProperties": False,
        }
        for role in ("system", "developer")
    ]
    return {
        "type": "array",
        "items": {"oneOf": [*system, user, assistant, tool]},
        "minItems": 1,
        "maxItems": limits.MAX_REQUEST_MESSAGES,
        "description": "The conversation's new messages (or, issue 15, its whole history); "
        "leading system or developer messages set the system prompt; the last is a user or "
        "tool message.",
    }


def _openai_request(schemas: dict[str, Any]) -> None:
    """`ChatCompletionCreate`: the gateway parameters it forwards are our own route's, checked
    by the same model, so their schemas are copied from `TurnCreate`."""
    body = schemas["ChatCompletionCreate"]
    turn = schemas["TurnCreate"]["properties"]
    params = {
        name: turn[name]
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "tools",
            "tool_choice",
            "response_format",
            "fallbacks",
            "fallback_config",
            "post_processing_steps",
            "transcript_id",
            "model_region",
        )
    }
    dropped = {
        "user": {"type": "string", "description": "Accepted and not forwarded"},
        "store": {"type": "boolean", "description": "Accepted and not forwarded"},
        "service_tier": {"type": "string", "description": "Accepted and not forwarded"},
        "parallel_tool_calls": {"type": "boolean", "description": "Accepted and not forwarded"},
    }
    body["properties"] = {**body["properties"], **params, **dropped}
    body["properties"]["messages"] = _openai_messages(schemas)
    body["properties"]["metadata"] = {
        "anyOf": [
            {
                "type": "object",
                "maxProperties": 16,
                "propertyNames": {"maxLength": 64},
                "additionalProperties": {"type": "string", "maxLength": 512},
                "properties": {
                    "conversation_id": {
                        "type": "string",
                        "pattern": CONVERSATION_ID.pattern,
                        "description": "The conversation, when no X-Conversation-Id header "
                        "names one",
                    }
                },
            },
            {"type": "null"},
        ]
    }


def _not_null(parameter: dict[str, Any]) -> None:
    """An optional header or query parameter is absent or a string: never JSON's null, which
    FastAPI writes for `X | None`."""
    schema = parameter.get("schema", {})
    options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
    if parameter.get("in") in ("header", "query") and len(options) == 1:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        parameter["schema"] = {**options[0], **rest}


def _complete(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema()
    schemas["OpenAIError"] = OPENAI_ERROR
    schemas["MessageCreate"] = _message_schema()
    schemas["ImportLines"] = _import_lines(schemas["MessageCreate"], schemas)
    schemas["ContentPart"]["if"] = {"properties": {"type": {"const": "text"}}}
    schemas["ContentPart"]["then"] = {
        "required": ["text"],
        "properties": {"text": {"type": "string"}},
    }
    update = schemas["ConversationUpdate"]["properties"]
    update["token_budget"]["anyOf"][0]["maximum"] = settings.max_token_budget
    if settings.max_conversation_ttl_seconds:
        ttl = update["ttl_seconds"]["anyOf"][0]
        ttl["minimum"] = 1
        ttl["maximum"] = settings.max_conversation_ttl_seconds
    token_ttl = schemas["EndUserTokenCreate"]["properties"]["ttl_seconds"]["anyOf"][0]
    token_ttl["maximum"] = settings.end_user_token_max_seconds
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    # A detached turn is read as a stream: `detach: true` needs `stream: true`.
    schemas["TurnCreate"].setdefault("allOf", []).append(
        {
            "if": {"properties": {"detach": {"const": True}}, "required": ["detach"]},
            "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
        }
    )
    _openai_request(schemas)
    turn = schemas["TurnCreate"]["properties"]
    # A single new message is the last one: a user message or a tool result.
    turn["message"] = {"oneOf": [schemas["MessageCreate"]["oneOf"][i] for i in (0, 2)]}
    turn["messages"] = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/MessageCreate"},
        "minItems": 1,
        "maxItems": limits.MAX_NEW_MESSAGES,
        "description": "Several new messages; the last is a user or tool message.",
    }
    components["securitySchemes"] = {
        "clientKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "A client key from API_KEYS, or in pass-through mode the caller's own "
            "gateway key (a raw key without `Bearer` is accepted too).",
        },
        "endUserToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An end-user token (client-key mode): a JWT with `iss` (the tenant), "
            "`sub`, `conv`, `scope`, `exp` and optional `model` / `max_tokens` caps.",
        },
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            key = (method, path)
            if key in _OPERATION_IDS:
                operation["operationId"] = _OPERATION_IDS[key]
            if path.startswith("/conversations"):
                operation["security"] = [{"clientKey": []}, {"endUserToken": []}]
            elif path == "/end-user-tokens" or path.startswith("/v1/"):
                operation["security"] = [{"clientKey": []}]
            for parameter in operation.get("parameters", []):
                _not_null(parameter)
            responses = operation["responses"]
            responses.pop("422", None)
            error_content = (
                {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
                if path.startswith("/v1/")
                else {"application/problem+json": {"schema": PROBLEM_REF}}
            )
            for status in _ERRORS.get(key, []):
                responses[str(status)] = {
                    "description": _STATUS_MEANINGS[status],
                    "content": error_content,
                }
            for (link_method, link_path, code), targets in _LINKS.items():
                if (link_method, link_path) == key:
                    responses[code]["links"] = {
                        name: {"operationId": target, "parameters": _SAME_ID}
                        for target, name in targets.items()
                    }
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve the completed document at /openapi.json (built once, on first request); the limits
    the operator sets are part of it."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                ),
                settings,
            )
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign] # FastAPI's documented way to extend it
