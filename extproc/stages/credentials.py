"""Swap the client's credential for the provider's, so provider keys never leave."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode

from ..config import CREDENTIAL_HEADERS
from ..decisions import Deny
from ..exchange import Exchange

# Sent keyless, the request would come back as the provider's 401, which the
# client would take for a problem with its own (valid) Tollway key.
CREDENTIAL_MISSING = Deny(
    500,
    "api_error",
    "provider_credential_missing",
    "The gateway has no credential for this provider. Its operator must configure one.",
    "tollway_provider_credential_missing",
)


class CredentialStage:
    def __init__(self, provider_keys: Mapping[str, str | None]) -> None:
        self.provider_keys = provider_keys  # upstream name -> key; replaced on reload

    def start(self, ex: Exchange) -> Deny | None:
        route = ex.route
        if route is None:
            return None
        key = self.provider_keys.get(route.name)
        if key is None and route.upstream.credential is not None:
            return CREDENTIAL_MISSING  # configured, but the variable or file is empty
        # A Tollway key must never reach a provider. On a route without auth
        # and without a provider key, the client's own credential passes.
        if route.upstream.auth or key is not None:
            ex.remove_headers.update(CREDENTIAL_HEADERS)
            # On every route: a key in the query must not reach any provider.
            if "key" in ex.query:
                pairs = parse_qsl(ex.query, keep_blank_values=True)
                kept = [(k, v) for k, v in pairs if k != "key"]
                if len(kept) != len(pairs):
                    ex.set_headers[":path"] = ex.path + (f"?{urlencode(kept)}" if kept else "")
        if key is not None:
            header = route.upstream.key_header
            ex.set_headers[header] = f"Bearer {key}" if header == "authorization" else key
        return None
