"""The README's first command on a fresh machine: the package without its test extras.

A fresh virtualenv gets `pip install` of this checkout (what `./scripts/demo` and the
Dockerfile install), then `tollway up --demo` from it must serve a chat completion to
the openai SDK with the key it prints, and stop cleanly on Ctrl-C. A module that only
a test extra provides (h2 once was) fails here, as it would for a new user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from .tollway_up import UpRun, children, eventually, gone

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 600


def _checkout_copy(dest: Path) -> Path:
    """The files a build reads (as the Dockerfile copies them), away from the work tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "extproc", dest / "extproc", ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("first-run")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    source = _checkout_copy(base / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    installed = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", str(source)],  # no [test]: what users get
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        env=env,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def test_the_first_command_serves_a_chat_completion_and_stops_cleanly(
    fresh_venv: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{fresh_venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    run = UpRun([str(fresh_venv / "bin/tollway"), "up", "--demo", "--port", "0"], tmp_path, env)
    try:
        run.wait_banner(timeout=120)
        assert run.key, run.stdout()
        assert Path(run.keys_file) == tmp_path / "tollway-keys.yaml"
        kids = children(run.proc.pid)
        assert len(kids) == 3, run.stderr()  # envoy, tollway serve, demo upstream
        for pid in kids:  # every child runs from the fresh venv, not from ours
            exe = Path(f"/proc/{pid}/exe").resolve()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert str(fresh_venv) in cmdline or "envoy" in exe.name, cmdline

        client = openai.OpenAI(base_url=f"{run.url}/v1", api_key=run.key, max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], timeout=10
        )
        assert reply.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{run.url}/v1", api_key="tw_wrong", max_retries=0).models.list()

        assert run.interrupt(timeout=30) == 0, run.stderr()
        eventually(lambda: all(gone(pid) for pid in kids), timeout=15, what="children gone")
        assert "Traceback" not in run.stderr(), run.stderr()
    finally:
        run.kill()


def test_certs_and_an_https_front_door_need_no_test_extra(fresh_venv: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    tollway = str(fresh_venv / "bin/tollway")
    made = subprocess.run(
        [tollway, "certs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    run = UpRun([tollway, "up", "--demo", "--tls", "--port", "0"], tmp_path, env)
    try:
        run.wait_banner(timeout=120)
        assert run.url.startswith("https://"), run.stdout()
    finally:
        run.kill()
