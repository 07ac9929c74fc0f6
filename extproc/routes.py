"""Which upstream a path goes to: the same longest-prefix table Envoy is given."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from .config import ApiKind, Upstream

# Endpoints whose JSON body names the model (the key's model allowlist needs it).
_MODEL_IN_BODY = re.compile(
    r"/(?:v1/)?(?:chat/completions|completions|embeddings|responses|messages"
    r"|messages/count_tokens|moderations|images/generations|audio/speech)/?$"
)
# Gemini and Azure name the model (deployment) in the path.
_GEMINI_MODEL = re.compile(r"/(?:tunedModels|models)/([^/:]+):[A-Za-z]+$")
_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: Upstream
    prefixes: tuple[str, ...]

    @property
    def api(self) -> ApiKind:
        return self.upstream.api

    def model_in_path(self, path: str) -> str | None:
        pattern = {"gemini": _GEMINI_MODEL, "azure": _AZURE_DEPLOYMENT}.get(self.api)
        if pattern is None:
            return None
        match = pattern.search(unquote(path) if "%" in path else path)
        return match.group(1) if match else None

    def model_in_body(self, method: str, path: str) -> bool:
        return method == "POST" and _MODEL_IN_BODY.search(path) is not None


class RouteTable:
    """Longest matching prefix wins, exactly as in the rendered Envoy routes."""

    def __init__(self, upstreams: dict[str, Upstream]) -> None:
        routes = {name: Route(name, up, up.prefixes) for name, up in upstreams.items()}
        self.entries: list[tuple[str, Route]] = sorted(
            ((prefix, route) for route in routes.values() for prefix in route.prefixes),
            key=lambda item: len(item[0]),
            reverse=True,
        )

    def match(self, path: str) -> Route | None:
        for prefix, route in self.entries:
            if path.startswith(prefix):
                return route
        return None
