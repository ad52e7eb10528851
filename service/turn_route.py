"""TurnRoute: the turn routes' parameters solved by plain calls instead of FastAPI's generic solver.

`POST /conversations/{id}/messages` (and `/regenerate`, of the same shape) is the hot path. FastAPI
documents and declares it from the endpoint's signature as for any route, but serving a request its
generic solver walks the whole dependency tree anew (the caller's sub-tree three times), reads the
Content-Type with the email package and builds a context for error messages: about a tenth of a
turn's CPU under load, more than trimming and breakpoints together (issue 10, py-spy).

TurnRoute keeps what is declared and swaps only how it is solved: the same steps, in the order
FastAPI takes them, with the validators taken from the route itself (so messages and error
locations are FastAPI's), as plain calls: the JSON body read as FastAPI reads it, the caller
(get_caller: 401 and 429 before any validation error), the body validated and checked (get_turn
or get_regenerate), the conversation id validated and the end user's scope checked
(get_conversation), the Idempotency-Key validated; the validation errors of all three raised
together as one RequestValidationError; then the endpoint itself. Its signature must stay the one
below: anything else refuses to build at start-up, so a new parameter cannot be missed here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.utils import request_body_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic_core import PydanticUndefined, from_json
from starlette.exceptions import HTTPException

from service.deps import (
    get_caller,
    get_conversation,
    get_idempotency_key,
    get_turn_services,
)

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
# The endpoint's parameters, in order, and what solves each after the body (whose check,
# get_turn or get_regenerate, is the route's own).
SHAPE = ("body", "ref", "caller", "services", "idempotency_key")
SOLVERS = (get_conversation, get_caller, get_turn_services, get_idempotency_key)


class TurnRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        dependant = self.dependant
        names = tuple(d.name for d in dependant.dependencies)
        calls = tuple(d.call for d in dependant.dependencies)
        body_field = self.body_field
        check = calls[0] if calls else None  # get_turn or get_regenerate: (body, request, caller)
        if names != SHAPE or calls[1:] != SOLVERS or body_field is None or check is None:
            raise TypeError(f"{self.path}: not a turn-shaped endpoint {names}")
        (id_field,) = dependant.dependencies[1].path_params
        (key_field,) = dependant.dependencies[4].header_params
        id_loc, key_loc = ("path", id_field.alias), ("header", key_field.alias)
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            body = await _json_body(request)
            caller = await get_caller(request)
            values, errors = await request_body_to_args([body_field], body, False)
            turn = (
                await check(values["body"], request=request, caller=caller) if not errors else None
            )
            conversation_id, id_errors = id_field.validate(
                request.path_params[id_field.alias], {}, loc=id_loc
            )
            errors += id_errors
            ref = None if id_errors else await get_conversation(request, caller, conversation_id)
            services = await get_turn_services(request)
            key = request.headers.get(key_field.alias)  # absent: None, the parameter's default
            if key is not None:
                key, key_errors = key_field.validate(key, {}, loc=key_loc)
                errors += key_errors
            if errors:
                raise RequestValidationError(errors, body=body)
            key = await get_idempotency_key(key)
            response: Response = await endpoint(turn, ref, caller, services, key)
            return response

        return handle


async def _json_body(request: Request) -> Any:
    """The body as FastAPI reads a JSON body: undefined (a missing body) when empty; malformed
    JSON is a validation error of type json_invalid at its position; any other failure to decode
    is a 400. (Bodies of other media types never get here: RequestMiddleware answers them 415.)"""
    raw = await request.body()
    if not raw:
        return PydanticUndefined
    try:
        return json_value(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ],
            body=exc.doc,
        ) from exc
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc


def json_value(raw: bytes) -> Any:
    """`json.loads(raw)`, the value FastAPI reads, and its errors.

    pydantic-core's parser reads it first: what it accepts (strict JSON, UTF-8, nesting under 200)
    the json module reads to the same value (tests/test_turn_route.py), at a fifth of the cost: the
    module's parse was 1.8% of a turn's instructions (issue 10, callgrind). Whatever it refuses
    (NaN and Infinity, lone surrogates, a byte-order mark or another encoding, deep nesting,
    malformed JSON) the json module reads as before, so what is accepted and every error stay
    FastAPI's own."""
    with contextlib.suppress(ValueError):
        return from_json(raw, allow_inf_nan=False)
    return json.loads(raw)
