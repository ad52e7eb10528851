"""The API against its own OpenAPI document: schemathesis generates requests from it (examples,
coverage, fuzzing, valid and invalid data) and follows its links statefully, with every check on,
against a real `python -m service` on real Redis and the stand-in gateway."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
import schemathesis.engine
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import (
    NegativeDataRejectionConfig,
    PositiveDataAcceptanceConfig,
)
from schemathesis.engine import Status, events

from service.limits import MAX_NEW_MESSAGES
from tests.processes import E2E_CLIENT_KEY, GatewayProcess, Replica, start_replicas, stop_all

EXAMPLES_PER_OPERATION = 40
STATEFUL_STEPS = 40


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {E2E_CLIENT_KEY}"},
            "checks": {
                "enabled": True,
                # A body over MAX_BODY_BYTES is refused with 413 before it is parsed: a
                # rejection as good as 422, which the default list leaves out.
                "negative_data_rejection": {
                    "expected-statuses": [
                        *NegativeDataRejectionConfig._DEFAULT_EXPECTED_STATUSES,
                        "413",
                    ]
                },
                # The stand-in refuses what real gateways refuse (a tool result that answers no
                # tool call, a tool call left unanswered): no schema can say that, so a valid
                # body may get the gateway's 400, passed on as it is (never our own status for a
                # schema-valid body: ours is only for malformed JSON).
                "positive_data_acceptance": {
                    "expected-statuses": [
                        *PositiveDataAcceptanceConfig._DEFAULT_EXPECTED_STATUSES,
                        "400",
                    ]
                },
                # A conversation exists from its first write: a turn after DELETE starts it
                # afresh (CONTRACT.md), which this check takes for the deleted one coming back.
                "use_after_free": {"enabled": False},
            },
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES_PER_OPERATION,
                "deterministic": True,
            },
            "phases": {"stateful": {"enabled": True, "max-steps": STATEFUL_STEPS}},
        }
    )


@pytest.fixture(scope="module")
def service_for_schemathesis(
    redis_url: str, gateway_process: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    log_dir: Path = tmp_path_factory.mktemp("schemathesis")
    (replica,) = start_replicas(
        1,
        redis_url,
        gateway_process.base_url,
        log_dir=log_dir,
        TOKEN_BUDGET="200000",  # generated messages are never over the budget
        # POST /end-user-tokens mints for this tenant (else every generated request is 403).
        END_USER_JWT_SECRETS=f"acme:{base64.b64encode(b'schemathesis-secret-' * 2).decode()}",
        LOCK_WAIT_SECONDS="10",
    )
    yield replica
    stop_all([replica])


def _failures(schema: Any) -> tuple[list[str], set[str]]:
    """Run every phase (examples, coverage, fuzzing, stateful) as `schemathesis run` would:
    one line per failed check or error, and the phases that ran to success."""
    found: list[str] = []
    passed: set[str] = set()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.PhaseFinished) and event.status == Status.SUCCESS:
            passed.add(event.phase.name.value)
        if isinstance(event, events.ScenarioFinished) and event.status != Status.SUCCESS:
            for case_id, checks in event.recorder.checks.items():
                interaction = event.recorder.interactions.get(case_id)
                answer = (
                    f"{interaction.response.status_code} {interaction.response.content!r:.300}"
                    if interaction is not None and interaction.response is not None
                    else "no response"
                )
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        found.append(
                            f"{event.recorder.label}: {check.name}: {failure.title}: "
                            f"{failure.message[:300]}\n{check.failure_info.code_sample:.1500}"
                            f"\n-> {answer}"
                        )
            if event.status == Status.ERROR:
                found.append(f"{event.recorder.label}: error")
        elif isinstance(event, events.NonFatalError):
            found.append(f"{event.label}: {event.info}")
        elif isinstance(event, events.FatalError):
            found.append(f"fatal: {event.exception!r}")
    return found, passed


def _encodable(value: Any) -> Any:
    """The value with lone surrogates (valid JSON escapes, not valid text) replaced and integers
    brought within 64 bits (JSON has no limit; no gateway takes more)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return max(-(2**63), min(2**63 - 1, value))
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    if isinstance(value, dict):
        return {_encodable(key): _encodable(item) for key, item in value.items()}
    return value


def _json_lines(_context: Any, value: Any) -> bytes:
    """An import's body: each item of the generated array on a line of its own."""
    items = value if isinstance(value, list) else [value]
    return b"".join(orjson.dumps(_encodable(item)) + b"\n" for item in items)


schemathesis.serializer("application/jsonl")(_json_lines)


def _within_unwritten_rules(_context: Any, case: Any) -> Any:
    """Rules a JSON Schema cannot state, applied to data meant to be valid: text is valid
    Unicode and integers fit in 64 bits, the last of several new messages is a user or tool
    message (on /v1, system messages come first), a detached /v1 turn is a streamed turn of a
    conversation, an Idempotency-Key is reused only with the same body, `replace_from` names a
    stored user message (left out here), and an import's messages come with `seq` their
    position (each rule is tested on its own elsewhere)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return case
    case.body = body = _encodable(case.body)
    if isinstance(body, dict) and isinstance(body.get("messages"), list) and body["messages"]:
        # /v1 admits a whole history (10,000 messages); what is new in it is at most 256.
        del body["messages"][MAX_NEW_MESSAGES - 1 :]
        # /v1: system and developer messages only open the conversation (the system prompt).
        body["messages"].sort(
            key=lambda m: not (isinstance(m, dict) and m.get("role") in ("system", "developer"))
        )
        last = body["messages"][-1]
        if isinstance(last, dict) and last.get("role") not in ("user", "tool"):
            body["messages"].append({"role": "user", "content": "go on"})
    # /v1: a detached turn (X-Detach) is a streamed turn of a conversation.
    if case.headers and case.headers.get("X-Detach") == "true" and isinstance(body, dict):
        body["stream"] = True
        case.headers.setdefault("X-Conversation-Id", "detached-1")
    if isinstance(body, dict):
        body.pop("replace_from", None)
    if isinstance(body, list):
        for seq, line in enumerate(body[1:], start=1):
            if isinstance(line, dict):
                line["seq"] = seq
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    return case


# Every operation's examples plus the stateful phase: about 90 s of CPU on a quiet 2-core machine,
# and well over the suite's 120 s per test under coverage beside a busy core. A hang is still
# caught, at 360 s.
@pytest.mark.timeout(360)
def test_the_api_holds_to_its_schema(service_for_schemathesis: Replica) -> None:
    schema = schemathesis.openapi.from_url(
        f"{service_for_schemathesis.url}/openapi.json", config=_config()
    )
    schema.hook("map_case")(_within_unwritten_rules)
    failures, passed = _failures(schema)
    assert failures == [], "\n\n".join(dict.fromkeys(failures))
    assert {"examples", "coverage", "fuzzing", "stateful"} <= passed
