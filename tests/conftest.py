"""Fixtures shared by every tier."""

from __future__ import annotations

import pytest

from extproc.config import Config


@pytest.fixture
def provider_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default upstreams' provider keys, so that their requests are not refused."""
    for upstream in Config().upstreams.values():
        if upstream.credential is not None and upstream.credential.env is not None:
            monkeypatch.setenv(upstream.credential.env, "sk-test-provider-key")
