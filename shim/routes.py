"""Which requests the gateway answers itself, forwards, or refuses. Pure logic.

Only known API paths reach the engine: an unknown path never starts it, and
vLLM's dev-mode control endpoints are unreachable in any spelling.
"""

from __future__ import annotations

import enum
import functools
import posixpath
from dataclasses import dataclass
from urllib.parse import unquote


class Kind(enum.Enum):
    HEALTH = "health"
    METRICS = "metrics"
    MODELS = "models"
    STATUS = "status"
    PAGE = "page"  # the status page's files (shim/page.py)
    EVENTS = "events"  # its event stream
    ADMIN_START = "admin_start"
    ADMIN_STOP = "admin_stop"
    ADMIN_SLEEP = "admin_sleep"
    ADMIN_WAKE = "admin_wake"
    ADMIN_YIELD = "admin_yield"
    ADMIN_RELEASE = "admin_release"
    ADMIN_RELOAD = "admin_reload"
    ADMIN_RESTART = "admin_restart"
    ADMIN_CONFIG = "admin_config"
    ENGINE = "engine"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"


# Endpoints that vLLM opens with VLLM_SERVER_DEV_MODE=1 (and a few debug ones).
# They control the engine itself; only the gateway may call them.
DEV_ENDPOINTS = frozenset({
    "sleep", "wake_up", "is_sleeping", "collective_rpc", "reset_prefix_cache",
    "reset_mm_cache", "reconfigure", "start_profile", "stop_profile", "server_info",
    "update_weights", "init_weights", "pause", "resume", "is_paused", "scale_elastic_ep",
    "is_scaling_elastic_ep", "load_lora_adapter", "unload_lora_adapter",
})

OWN: dict[str, tuple[str, Kind]] = {
    "/health": ("GET", Kind.HEALTH),
    "/metrics": ("GET", Kind.METRICS),
    "/v1/models": ("GET", Kind.MODELS),
    "/gateway/status": ("GET", Kind.STATUS),
    "/gateway/reload": ("POST", Kind.ADMIN_RELOAD),
    "/gateway/restart": ("POST", Kind.ADMIN_RESTART),
    "/gateway/config": ("GET", Kind.ADMIN_CONFIG),
    "/gateway/start": ("POST", Kind.ADMIN_START),
    "/gateway/stop": ("POST", Kind.ADMIN_STOP),
    "/gateway/sleep": ("POST", Kind.ADMIN_SLEEP),
    "/gateway/wake": ("POST", Kind.ADMIN_WAKE),
    "/gateway/yield": ("POST", Kind.ADMIN_YIELD),
    "/gateway/release": ("POST", Kind.ADMIN_RELEASE),
    "/gateway": ("GET", Kind.PAGE),
    "/gateway/app.js": ("GET", Kind.PAGE),
    "/gateway/app.css": ("GET", Kind.PAGE),
    "/gateway/favicon.svg": ("GET", Kind.PAGE),
    "/gateway/events": ("GET", Kind.EVENTS),
}

# Engine endpoints, by method. Those in JSON_BODY are checked before the
# engine is started, so that a malformed request never costs a cold start.
ENGINE_POST = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/tokenize", "/detokenize",
    "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
})
ENGINE_GET = frozenset({"/version"})
JSON_BODY = ENGINE_POST - {"/v1/audio/transcriptions", "/v1/audio/translations"}
# Endpoints that generate tokens, and the fields that bound how many: the
# max_tokens guardrail checks them, and sets the first where none is given.
GENERATION: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/responses": ("max_output_tokens",),
}
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Route:
    kind: Kind
    path: str  # canonical path
    query: str  # raw query string, without '?'

    @functools.cached_property
    def label(self) -> str:
        """A bounded name for metrics: arbitrary paths must not make new series."""
        return self.path if self.kind not in (Kind.NOT_FOUND, Kind.METHOD_NOT_ALLOWED) else "other"

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def canonical_path(raw: str) -> str:
    """Decode percent-escapes (repeatedly, so %252F cannot hide a slash),
    lower-case, collapse slashes and dot segments, drop a trailing slash."""
    path = raw
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/").lower()
    path = posixpath.normpath("/" + path.lstrip("/"))
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


# Routes of recent (method, target) pairs: clients send the same few
# requests over and over. Bounded: any target may come in.
_ROUTE_CACHE: dict[tuple[str, str], Route] = {}
_ROUTE_CACHE_MAX = 256


def classify(method: str, target: str) -> Route:
    key = (method, target)
    route = _ROUTE_CACHE.get(key)
    if route is None:
        if len(_ROUTE_CACHE) >= _ROUTE_CACHE_MAX:
            _ROUTE_CACHE.clear()
        route = _ROUTE_CACHE[key] = _classify(method, target)
    return route


def _classify(method: str, target: str) -> Route:
    raw_path, _, query = target.partition("?")
    path = canonical_path(raw_path)
    first = path.strip("/").split("/", 1)[0]
    if first in DEV_ENDPOINTS:
        return Route(Kind.NOT_FOUND, path, query)
    if path in OWN:
        want, kind = OWN[path]
        if method == want or (method == "HEAD" and want == "GET"):
            return Route(kind, path, query)
        return Route(Kind.METHOD_NOT_ALLOWED, path, query)
    if path in ENGINE_POST:
        return Route(Kind.ENGINE if method == "POST" else Kind.METHOD_NOT_ALLOWED, path, query)
    if path in ENGINE_GET:
        return Route(Kind.ENGINE if method == "GET" else Kind.METHOD_NOT_ALLOWED, path, query)
    return Route(Kind.NOT_FOUND, path, query)
