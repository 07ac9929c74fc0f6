"""Sans-IO stages: each looks at an Exchange and returns a decision value."""

from __future__ import annotations

from typing import Protocol

from ..decisions import Deny, Phase
from ..exchange import Exchange


class Stage(Protocol):
    def on_request_headers(self, ex: Exchange) -> Deny | Phase:
        """Decide at request headers; return the later phases this stage needs."""
        ...

    def on_request_body(self, ex: Exchange) -> Deny | None:
        """Decide on the buffered request body (only if some stage asked for it)."""
        ...
