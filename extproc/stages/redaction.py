"""Redaction: PII and secrets out of the text a request sends to the model.

At the request body the flow reads the texts its API sends the model
(providers/texts.py), runs the policy's detectors over each, and either
refuses the request (an entity whose action is ``block``: a 400 naming the
entity types, never the values) or replaces every finding in place; the body
is written out once, after every stage (body.py), with its new length.

Which policy: the key's own (``keys create --redaction NAME``), else its
tenant's (a policy listing the tenant), else ``redaction``; none on a route
with ``redaction: false``. A body that cannot be read as the API's JSON, or a
detector that fails, cannot be checked: refused unless the policy says
``on_error: fail_open`` (counted either way). A prompt longer than
``INLINE_CHARS`` is searched a window at a time, other streams running in
between (an Ask whose call pauses on the event loop).

With ``responses`` or ``restore`` the flow also reads the answer: a JSON one
held whole and written out once, an SSE one edited event by event with a few
characters held back per text stream (redaction/answer.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from .. import error_shapes, logs
from ..config import Config, ConfigError, RedactionConfig, SecretSource
from ..decisions import Ask, BackendUnavailable, BodyMode, Deny, Outcome, Phase, bad_request
from ..events import ResponseEvents
from ..exchange import BodyError, Exchange
from ..kinds import Api
from ..metrics import Metrics
from ..providers.sse import Event
from ..providers.texts import Slot, answer_slots, carrier, prompt_slots, stream_event, text_event
from ..redaction.answer import AnswerText
from ..redaction.custom import GitleaksRule, load_gitleaks
from ..redaction.detect import Detector
from ..redaction.findings import Finding
from ..redaction.policy import NAMES, Policy, Rewrite
from . import Flow

log = logging.getLogger("tollway")

# Prompts longer than this (in characters of text) are searched a window at a time.
INLINE_CHARS = 64 << 10
WINDOW_CHARS = 16 << 10
_JOINT = "\n\n"  # between the texts of one request, searched as one

FAILED = Deny(
    500,
    "api_error",
    "redaction_failed",
    "The request could not be checked for sensitive data, so it was not sent.",
    "tollway_redaction_failed",
)
TOO_LONG = Deny(
    503,
    "api_error",
    "redaction_timeout",
    "The prompt is too long to be checked for sensitive data in time, so it was not sent.",
    "tollway_redaction_timeout",
)
UNKNOWN_POLICY = Deny(
    500,
    "api_error",
    "redaction_policy_unknown",
    "This key's redaction policy is not configured, so the request was not sent.",
    "tollway_redaction_policy_unknown",
)


def build(
    config: Config, metrics: Metrics, pause: Callable[[], Awaitable[None]] | None = None
) -> RedactionStage:
    """The stage of ``config``'s redaction blocks (reads the hash key once, here)."""
    main = config.redaction
    main_key = main.hash_key if main is not None else None
    default = None if main is None else compile_policy("default", main, main_key)
    policies = {
        name: compile_policy(name, block, main_key)
        for name, block in config.redaction_policies.items()
    }
    # A long prompt's search must end before Envoy stops waiting for the answer.
    budget = 0.75 * config.envoy.extproc_message_timeout_s
    return RedactionStage(default, policies, metrics, config.max_body_bytes, pause, budget)


def compile_policy(name: str, block: RedactionConfig, main_key: SecretSource | None) -> Policy:
    where = "redaction" if name == "default" else f"redaction_policies.{name}"
    try:
        rules = _gitleaks(block.gitleaks_file, f"{where}.gitleaks_file")
        detector = Detector(
            block.entities,
            block.phone_regions,
            [(c.name, c.pattern) for c in block.custom],
            rules,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    names = (*block.entities, *(c.name for c in block.custom))
    if rules and "secrets" not in names:
        names += ("secrets",)
    actions = {e: block.actions.get(e, block.action) for e in names}
    source = block.hash_key or main_key
    key = _read_secret(source, f"{where}.hash_key") if "hash" in actions.values() else None
    return Policy(
        name,
        detector,
        actions,
        hash_key=key,
        responses=block.responses,
        restore=block.restore,
        fails_closed=block.on_error == "fail_closed",
        tenants=block.tenants,
    )


def _gitleaks(path: Path | None, where: str) -> list[GitleaksRule]:
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    return load_gitleaks(text, str(path))


def _read_secret(source: SecretSource | None, where: str) -> bytes:
    assert source is not None  # config refuses a hash action without a key
    if source.env is not None:
        value = os.environ.get(source.env, "")
        what = f"environment variable {source.env}"
    else:
        assert source.file is not None
        try:
            value = source.file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {source.file}: {exc.strerror}") from None
        what = f"file {source.file}"
    value = value.strip()
    if len(value) < 16:
        raise ConfigError(f"{where}: {what} must hold a key of 16 characters or more")
    return value.encode()


class RedactionStage:
    def __init__(
        self,
        default: Policy | None,
        policies: Mapping[str, Policy],
        metrics: Metrics,
        max_answer_bytes: int = 16 << 20,
        pause: Callable[[], Awaitable[None]] | None = None,
        budget_s: float = 1.5,
    ) -> None:
        # Lets other streams run (the event loop's turn); None: every prompt inline.
        self.pause = pause
        self.budget_s = budget_s  # a long prompt's search, at most
        self.max_answer_bytes = max_answer_bytes  # a JSON answer held whole at most
        self.default = default
        self.policies = dict(policies)
        # A tenant's policy: the one that lists it (config allows one at most).
        self.tenants = {t: p for p in policies.values() for t in p.tenants}
        self.metrics = metrics
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._warned: set[str] = set()

    def __bool__(self) -> bool:
        return self.default is not None or bool(self.policies)

    def start(self, ex: Exchange) -> RedactionFlow | Deny | None:
        call = ex.call
        if call is None or call.api is None or not call.route.upstream.redaction:
            return None
        identity = ex.identity
        policy = self.default
        if identity is not None:
            if identity.redaction is not None:
                found = self.policies.get(identity.redaction)
                if found is None:
                    if identity.id not in self._warned:  # once a key, not once a request
                        self._warned.add(identity.id)
                        log.error(
                            "key %s names redaction policy %r, which is not configured",
                            identity.id,
                            identity.redaction,
                            extra=logs.about(ex),
                        )
                    return UNKNOWN_POLICY
                policy = found
            else:
                policy = self.tenants.get(identity.tenant, policy)
        if policy is None:
            return None
        return RedactionFlow(self, policy, call.api)

    def count(self, entity: str, action: str, where: str, n: int) -> None:
        child = self._counters.get((entity, action, where))
        if child is None:
            child = self._counters[entity, action, where] = self.metrics.redactions.labels(
                entity, action, where
            )
        child.inc(n)


class RedactionFlow(Flow):
    __slots__ = (
        "_chunks",
        "_size",
        "answer",
        "api",
        "edits_events",
        "policy",
        "rewrite",
        "stage",
        "wants",
    )

    def __init__(self, stage: RedactionStage, policy: Policy, api: Api) -> None:
        self.stage = stage
        self.policy = policy
        self.api = api
        self.rewrite = Rewrite(policy)
        self.wants = Phase.REQUEST_BODY
        self.answer: AnswerText | None = None
        self.edits_events = False
        self._chunks: list[bytes] = []  # a JSON answer, held until it is whole
        self._size = 0
        if policy.responses or policy.restore:
            self.wants |= Phase.RESPONSE_HEADERS

    def on_request_body(self, ex: Exchange) -> Deny | Ask[Deny | None] | None:
        if not ex.body:
            return None  # nothing to check (a GET of stored completions, say)
        try:
            doc = ex.json()
        except BodyError as exc:
            return self._unchecked(bad_request("invalid_body", f"{exc}; it cannot be checked"))
        slots = prompt_slots(self.api, doc)
        pause = self.stage.pause
        if pause is not None and sum(len(c[k]) for c, k in slots) > INLINE_CHARS:
            # A long prompt is searched a window at a time, and other streams run in
            # between: the event loop never waits for more than one window.
            return Ask(
                "redaction",
                lambda: self._find_paused(slots, pause),
                lambda found: self._decide(ex, found),
                lambda reason: self._unchecked(TOO_LONG if reason == "timeout" else FAILED),
                None,
            )
        try:
            found = self._find(slots)
        except Exception:
            log.exception("redaction failed", extra=logs.about(ex))
            return self._unchecked(FAILED)
        return self._decide(ex, found)

    def _find(self, slots: list[Slot]) -> list[tuple[Slot, list[Finding]]]:
        """All the texts searched as one (each finder called once, not once a text),
        the findings handed back to their texts."""
        texts = [container[key] for container, key in slots]
        return self._per_slot(slots, texts, self.policy.detector.find(_JOINT.join(texts)))

    async def _find_paused(
        self, slots: list[Slot], pause: Callable[[], Awaitable[None]]
    ) -> list[tuple[Slot, list[Finding]]]:
        texts = [container[key] for container, key in slots]
        joined = _JOINT.join(texts)
        findings: list[Finding] = []
        deadline = time.monotonic() + self.stage.budget_s
        for window in self.policy.detector.find_all(joined, WINDOW_CHARS):
            findings += window
            if time.monotonic() > deadline:
                # Envoy would give up on this message soon: answer (the policy decides)
                # and stop working for a request that is about to fail anyway.
                raise BackendUnavailable("timeout")
            await pause()
        return self._per_slot(slots, texts, findings)

    def _per_slot(
        self, slots: list[Slot], texts: list[str], findings: list[Finding]
    ) -> list[tuple[Slot, list[Finding]]]:
        """Findings of the joined texts, by text; one across a joint is of neither."""
        found: list[tuple[Slot, list[Finding]]] = []
        if not findings:
            return found
        at, start = 0, 0  # the text findings[...] fall in, and where it starts
        end = len(texts[0])
        mine: list[Finding] = []
        for f in findings:
            while f.start >= end + len(_JOINT):
                if mine:
                    found.append((slots[at], mine))
                    mine = []
                at += 1
                start = end + len(_JOINT)
                end = start + len(texts[at])
            if start <= f.start and f.end <= end:
                mine.append(Finding(f.start - start, f.end - start, f.entity, f.kind))
        if mine:
            found.append((slots[at], mine))
        for _, mine in found:
            self.rewrite.check(mine)
        return found

    def _decide(self, ex: Exchange, found: list[tuple[Slot, list[Finding]]]) -> Deny | None:
        rewrite = self.rewrite
        if rewrite.blocked:
            return self._blocked()
        for (container, key), findings in found:
            container[key] = rewrite.apply(container[key], findings)
        if found:
            assert ex.document is not None
            ex.document.edited(required=True)
            self._count("request")
        return None

    # ---- the answer ----

    def on_response_headers(self, ex: Exchange) -> BodyMode:
        if not 200 <= ex.status < 300:
            return BodyMode.NONE
        answer = AnswerText(self.rewrite, self.policy.responses, self.policy.restore)
        if not answer.active:
            return BodyMode.NONE  # restore only, and the request had no placeholders
        encoding = ex.response_headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            # Envoy's route removes accept-encoding on the way up; an upstream that
            # compresses anyway cannot be read (counted; it goes on as it is).
            self.stage.metrics.redaction_failures.labels("failed_open").inc()
            log.warning(
                "an answer came compressed (%s) and was not redacted",
                encoding,
                extra=logs.about(ex),
            )
            return BodyMode.NONE
        self.answer = answer
        if ex.events is not None:
            self.edits_events = True
            return BodyMode.STREAMED
        if not ex.response_headers.get("content-type", "").startswith("application/json"):
            return BodyMode.NONE
        ex.remove_response_headers.add("content-length")  # the body changes length
        return BodyMode.STREAMED

    def on_response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes | None:
        """A JSON answer is held until it is whole, then written out once."""
        if self._size < 0:  # too large to check: the policy decided
            return self._unchecked_answer(ex, b"", chunk, end)
        self._size += len(chunk)
        if self._size > self.stage.max_answer_bytes:
            self._failed_answer()
            self._size = -1
            held, self._chunks = b"".join(self._chunks), []
            return self._unchecked_answer(ex, held, chunk, end)
        self._chunks.append(chunk)
        if not end:
            return b""
        body = b"".join(self._chunks)
        self._chunks.clear()
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        answer = self.answer
        assert answer is not None
        changed = False
        for container, key in answer_slots(self.api, doc):
            text = container[key]
            new = answer.whole(text)
            if new != text:
                container[key] = new
                changed = True
        return orjson.dumps(doc) if changed else body

    def on_response_events(self, ex: Exchange, events: ResponseEvents, end: bool) -> None:
        answer, api = self.answer, self.api
        assert answer is not None
        for event, data in events.new:
            if not isinstance(data, dict):
                if event.data.strip() == "[DONE]":  # OpenAI: nothing may be held after it
                    self._flush_all(events, event, {})
                continue
            found = stream_event(api, event.type, data)
            if not found.pieces and not found.ends:
                continue
            changed = False
            last = {s: i for i, (_, s) in enumerate(found.pieces) if s in found.ends}
            for i, ((container, key), stream) in enumerate(found.pieces):
                text = container[key]
                if stream is None:
                    new = answer.whole(text)
                else:
                    new = answer.piece(stream, text, last=last.get(stream) == i)
                if new != text:
                    container[key] = new
                    changed = True
            for stream in found.ends:
                if stream in last:
                    continue  # sent with its last piece
                held = answer.flush(stream)
                if not held:
                    continue
                slot = carrier(api, data, stream)
                if slot is None:
                    kind, text = text_event(api, data, stream, held)
                    events.insert_before(event, Event(kind, text))
                else:
                    container, key = slot
                    container[key] = (container.get(key) or "") + held
                    changed = True
            if changed:
                events.replace(event, orjson.dumps(data).decode())
        if end:
            self._count("response")

    def _flush_all(self, events: ResponseEvents, before: Event, data: dict[str, Any]) -> None:
        answer = self.answer
        assert answer is not None
        for stream in answer.streams_held():
            held = answer.flush(stream)
            if held:
                kind, text = text_event(self.api, data, stream, held)
                events.insert_before(before, Event(kind, text))

    def finish(self, ex: Exchange, outcome: Outcome) -> None:
        self._count("response")

    def _unchecked_answer(self, ex: Exchange, held: bytes, chunk: bytes, end: bool) -> bytes:
        """Fail open: what was held and the rest as they come. Closed: nothing of it;
        the body ends as an error document instead."""
        if not self.policy.fails_closed:
            return held + chunk
        if not end:
            return b""
        message = "The answer was too large to be checked for sensitive data."
        error = error_shapes.error_document(
            ex.dialect, 502, "api_error", "redaction_failed", message
        )
        return orjson.dumps(error)

    def _failed_answer(self) -> None:
        outcome = "failed_closed" if self.policy.fails_closed else "failed_open"
        self.stage.metrics.redaction_failures.labels(outcome).inc()

    def _count(self, where: str) -> None:
        counts = self.rewrite.counts
        for (entity, action), n in counts.items():
            self.stage.count(entity, action, where, n)
        counts.clear()

    def _blocked(self) -> Deny:
        self._count("request")
        blocked = self.rewrite.blocked
        what = []
        for entity in sorted(blocked):
            name = NAMES.get(entity, entity)
            kinds = ", ".join(sorted(k for k in blocked[entity] if k != entity))
            what.append(f"{name} ({kinds})" if kinds else name)
        return bad_request(
            "sensitive_data_blocked",
            f"The request was not sent: it contains {', '.join(what)}. "
            "Remove it and send the request again.",
        )

    def _unchecked(self, denial: Deny) -> Deny | None:
        """The body cannot be checked: the policy decides."""
        closed = self.policy.fails_closed
        self.stage.metrics.redaction_failures.labels(
            "failed_closed" if closed else "failed_open"
        ).inc()
        return denial if closed else None
