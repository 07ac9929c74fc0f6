"""The audit log: who changed which key, what a reload changed, who was refused.

JSON lines, one event each (see README, Audit log). Never a secret, a prompt or
a completion: key ids (public, see keys.py), names, tenants, rule names,
addresses, request ids. The destination is a file (mode 0600, rotated by size,
shared by several processes) or standard output. Denials are throttled per kind
(a token bucket per auth failure reason or limit rule), so a flood cannot fill
the disk; what is held back is counted in a "suppressed" line. In `serve` one
thread writes, so the event loop never waits on a disk or a pipe; allowed
requests never reach this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import queue
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .config import CREDENTIAL_HEADERS, STDOUT, AuditConfig
from .decisions import Deny

if TYPE_CHECKING:
    from .exchange import Exchange
    from .keys import KeyRecord
    from .metrics import Metrics

log = logging.getLogger("tollway")

# Every event an audit line can name (the metric's label set).
EVENTS = (
    "started",
    "stopped",
    "key_created",
    "key_revoked",
    "key_changed",
    "keys_reloaded",
    "credentials_reloaded",
    "auth_failure",
    "limit_denied",
    "suppressed",
)
MAX_IDS = 20  # key ids listed in one reload line (the counts are always whole)
_MAX_CHARS = 256  # a client-controlled string (the path) is cut to this
# The public id of something that looks like a Tollway key; the secret after it is
# never captured.
_KEY_ID = re.compile(r"tw_([0-9a-f]{12})_")
_KEYLIKE = re.compile(r"tw_[0-9a-f]{12}_\S*")

# (client address, Envoy's request id) from Envoy's attributes; the id, when Envoy sends
# no attribute for it, is its x-request-id header (the same value)
Peer = tuple[str, str]


class Sink(Protocol):
    def write(self, line: bytes) -> None: ...

    def close(self) -> None: ...


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class StreamSink:
    """Standard output (or error): the platform collects and rotates it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, line: bytes) -> None:
        _write_all(self.fd, line)

    def close(self) -> None:
        return None


class RotatingFile:
    """Appends lines to ``path`` (0600); past ``max_bytes`` it becomes ``path.1`` (the
    older ones move up, ``path.<backups>`` is dropped) and a new file starts.

    Several processes may share the file (replicas, `tollway keys`): each line is one
    O_APPEND write; rotation happens under a lock file and each writer follows the
    path to the new file when another one rotated it. Every file it creates is 0600
    whatever the umask (rotation renames, so backups keep that mode), and an existing
    file with a looser mode is tightened. Anything but a regular file (a FIFO,
    /dev/stderr) is written as it is, never rotated or chmodded.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = -1
        self._regular = False
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        self._regular = stat.S_ISREG(st.st_mode)
        if self._regular and stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd

    def write(self, line: bytes) -> None:
        if self._regular:
            self._follow()
        _write_all(self._fd, line)
        if self._regular and os.fstat(self._fd).st_size >= self.max_bytes:
            self._rotate()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _same_file(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _follow(self) -> None:
        """Another writer rotated (or someone moved) the file: write to the new one."""
        if not self._same_file():
            self._open()

    def _rotate(self) -> None:
        with self._locked():
            # Checked again under the lock: another writer may have rotated already.
            if self._same_file() and os.fstat(self._fd).st_size >= self.max_bytes:
                for i in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._open()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


class Throttle:
    """A token bucket per kind: ``burst`` lines at once, then ``rate`` a second. Kinds
    come from closed sets (reasons, rule names), so the buckets are bounded too. Used
    from one thread (the event loop)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[tuple[str, str], list[float]] = {}  # kind -> [tokens, at]
        self._held: dict[tuple[str, str], list[float]] = {}  # kind -> [count, first, last]

    def allow(self, kind: tuple[str, str]) -> bool:
        now = self.clock()
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = [float(self.burst), now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return True
        bucket[0] = tokens
        held = self._held.get(kind)
        if held is None:
            self._held[kind] = [1, now, now]
        else:
            held[0] += 1
            held[2] = now
        return False

    def take_held(self) -> list[tuple[tuple[str, str], int, float, float]]:
        """What was held back since the last call, by kind; then starts again."""
        held, self._held = self._held, {}
        return [(kind, int(h[0]), h[1], h[2]) for kind, h in held.items()]


def _time(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _bounded(text: str) -> str:
    return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS] + "...[truncated]"


def denial_kind(deny: Deny) -> str | None:
    """The audit event of a denial: an authentication or authorisation failure (401,
    403) or a limit or budget (429); others (400, 404, 413, 5xx) are not audited."""
    if deny.status in (401, 403):
        return "auth_failure"
    if deny.status == 429:
        return "limit_denied"
    return None


def claimed_key_id(ex: Exchange) -> str | None:
    """The public id of the Tollway key a client sent, read from the key's shape: the
    id it claims, known even when the key is wrong. The secret part is never read."""
    for name in CREDENTIAL_HEADERS:
        value = ex.headers.get(name)
        if value is not None:
            match = _KEY_ID.search(value)
            if match is not None:
                return match.group(1)
    match = _KEY_ID.search(ex.query) if "tw_" in ex.query else None
    return match.group(1) if match is not None else None


def public(value: Any) -> Any:
    """A command-line value as it may be recorded: anything shaped like a key keeps
    only its public id (someone may type a key where a name or id belongs)."""
    if isinstance(value, str) and "tw_" in value:
        return _KEYLIKE.sub(lambda m: m.group(0)[:16] + "...", value)
    return value


def operator() -> dict[str, Any]:
    """Who runs this command: the local OS user (and who ran sudo), on which host."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    who: dict[str, Any] = {"user": user, "uid": uid, "host": socket.gethostname()}
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        who["sudo_user"] = sudo
    return who


def key_changes(old: Iterable[KeyRecord], new: Iterable[KeyRecord]) -> dict[str, Any]:
    """What a keys-file reload changed: counts and (some of) the ids."""
    before = {r.id: r for r in old}
    after = {r.id: r for r in new}
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(i for i in after.keys() & before.keys() if after[i] != before[i])
    out: dict[str, Any] = {
        "keys": len(after),
        "added": len(added),
        "removed": len(removed),
        "changed": len(changed),
    }
    for name, ids in (("added_ids", added), ("removed_ids", removed), ("changed_ids", changed)):
        if ids:
            out[name] = ids[:MAX_IDS]
    return out


def credential_changes(
    old: Mapping[str, str | None], new: Mapping[str, str | None]
) -> dict[str, Any]:
    """Upstream names whose provider key appeared, changed or went: names only."""
    changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
    missing = sorted(n for n, v in new.items() if v is None)
    return {"changed": changed, "missing": missing}


class AuditLog:
    """Writes audit events; ``threaded`` puts the writing on a thread of its own (serve),
    else each line is written before the call returns (the CLI)."""

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics | None = None,
        *,
        rate: float = 5.0,
        burst: int = 50,
        clock: Callable[[], float] = time.time,
        threaded: bool = False,
        max_queued: int = 10_000,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.throttle = Throttle(rate, burst, clock)
        self._queue: queue.Queue[bytes | None] | None = (
            queue.Queue(max_queued) if threaded else None
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # unthreaded: reload thread and loop may both write
        self._failing = False
        self._closed = False

    # ---- events -------------------------------------------------------------------

    def event(self, event: str, **fields: Any) -> None:
        """One line, never throttled (key changes, reloads, start and stop are rare)."""
        line = {"time": _time(self.clock()), "event": event, **fields}
        self._put(orjson.dumps(line) + b"\n")
        if self.metrics is not None:
            self.metrics.audit_events.labels(event).inc()

    def denied(self, ex: Exchange, deny: Deny, peer: Callable[[], Peer]) -> None:
        """A request Tollway refused; only the kinds worth auditing, and only as many
        as the throttle lets through (``peer`` is asked only then)."""
        event = denial_kind(deny)
        if event is None:
            return
        facts = dict(deny.audit)
        reason = facts.get("rule", deny.code) if event == "limit_denied" else deny.code
        if not self.throttle.allow((event, reason)):
            if self.metrics is not None:
                self.metrics.audit_suppressed.labels(event).inc()
            return
        address, request_id = peer()
        fields: dict[str, Any] = {
            "reason": deny.code,
            "status": deny.status,
            "request_id": request_id or ex.headers.get("x-request-id", ""),
            "client": address,
            "method": ex.method,
            "path": _bounded(ex.path),
            "route": ex.route.name if ex.route is not None else None,
        }
        identity = ex.identity
        key_id = ex.metadata.get("key_id")
        if identity is not None:
            fields.update(key_id=identity.id, key_name=identity.name, tenant=identity.tenant)
        elif key_id is not None:  # known but refused: revoked or expired
            fields["key_id"] = key_id
        else:
            claimed = claimed_key_id(ex)
            if claimed is not None:
                fields["claimed_key_id"] = claimed  # what the client's key says it is
        fields.update(facts)
        self.event(event, **fields)

    def flush_suppressed(self) -> None:
        """One "suppressed" line per kind that held lines back since the last call."""
        for (event, reason), count, first, last in self.throttle.take_held():
            self.event(
                "suppressed",
                of=event,
                reason=reason,
                count=count,
                first=_time(first),
                last=_time(last),
            )

    # ---- writing ------------------------------------------------------------------

    def _put(self, line: bytes) -> None:
        q = self._queue
        if q is None:
            with self._lock:
                self._write(line)
            return
        if self._thread is None:
            self._start()
        try:
            q.put_nowait(line)
        except queue.Full:  # the disk or pipe is stalled: lose the line, not the loop
            self._dropped("queue_full")

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            line = self._queue.get()
            if line is None:
                return
            self._write(line)

    def _write(self, line: bytes) -> None:
        try:
            self.sink.write(line)
        except OSError as exc:
            self._dropped("error")
            if not self._failing:
                self._failing = True
                log.error("audit log not written: %s", exc)
            return
        if self._failing:
            self._failing = False
            log.warning("audit log written again")

    def _dropped(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.audit_dropped.labels(reason).inc()

    def close(self, timeout: float = 5.0) -> None:
        """Counts what is held back, writes what is queued, closes the file."""
        if self._closed:
            return
        self._closed = True
        self.flush_suppressed()
        if self._queue is not None and self._thread is not None:
            with contextlib.suppress(queue.Full):  # a stalled sink must not hang shutdown
                self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
        self.sink.close()


def open_log(
    config: AuditConfig,
    metrics: Metrics | None = None,
    *,
    threaded: bool = True,
    stdout_fd: int = 1,
    clock: Callable[[], float] = time.time,
) -> AuditLog | None:
    """The audit log the config asks for (None when off); a file that cannot be opened
    raises OSError (serve refuses to start unaudited)."""
    if not config.enabled:
        return None
    sink: Sink
    if config.file == STDOUT:
        sink = StreamSink(stdout_fd)
    else:
        sink = RotatingFile(config.file, config.max_bytes, config.backups)
    return AuditLog(
        sink,
        metrics,
        rate=config.denials_per_s,
        burst=config.denials_burst,
        clock=clock,
        threaded=threaded,
    )
