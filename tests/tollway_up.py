"""`tollway up` as a user runs it: a real subprocess, its banner read from its output."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any


def eventually(check: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll until ``check`` returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"{what}: not met in {timeout:.0f}s"
            return result
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" in status.read_text()
    except FileNotFoundError:
        return True


class UpRun:
    """A running `tollway up`: its output collected line by line, its banner parsed."""

    def __init__(self, argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            assert stream is not None
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()
        self.url = self.key = self.keys_file = ""

    @staticmethod
    def _collect(stream: IO[str], lines: list[str]) -> None:
        lines.extend(stream)

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return "".join(self.err)

    def wait_banner(self, timeout: float = 90) -> str:
        """Wait for the banner; sets ``url``, ``key`` (demo only) and ``keys_file``."""
        eventually(
            lambda: "Ctrl-C stops everything" in self.stdout() or self.proc.poll() is not None,
            timeout,
            "the banner of tollway up",
        )
        out = self.stdout()
        url = re.search(r"front door\s+(https?://\S+)", out)
        keys_file = re.search(r"keys file\s+(\S+)", out)
        assert url and keys_file, f"no banner; stdout:\n{out}\nstderr:\n{self.stderr()}"
        key = re.search(r"demo key\s+(tw_\S+)", out)
        self.url, self.keys_file, self.key = url[1], keys_file[1], key[1] if key else ""
        return out

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C; the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def tollway(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`tollway ARGS` as a user runs it (this checkout's package); by default with a
    bare environment, so nothing of the test's own leaks into the command."""
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin"} if env is None else env,
        check=check,
    )
