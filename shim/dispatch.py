"""The dispatch step: from a request's route and body to what serves it.

Pure: no I/O, and nothing of the engines but their configuration. The
gateway (server.py) calls `dispatch` on each request that the edge (edge.py)
has read, then does what the step says: answer one of the gateway's own
endpoints, list the configured models, or forward the body, adapted (the
max_tokens guardrail), to the engine that serves the request's model. One
engine is a fleet of one: the same step picks it; only the errors differ
(with one engine a request may leave the model out).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import EngineConfig
from .errors import BadRequest, GatewayError, MethodNotAllowed, NotFound
from .routes import GENERATION, JSON_BODY, Kind, Route
from .security import apply_max_tokens

ADMIN_KINDS = frozenset({Kind.ADMIN_START, Kind.ADMIN_STOP, Kind.ADMIN_SLEEP, Kind.ADMIN_WAKE,
                         Kind.ADMIN_YIELD, Kind.ADMIN_RELEASE, Kind.ADMIN_RELOAD, Kind.ADMIN_RESTART,
                         Kind.ADMIN_CONFIG})
# The gateway answers these itself; none starts or wakes an engine.
OWN_KINDS = frozenset({Kind.HEALTH, Kind.STATUS, Kind.PAGE, Kind.EVENTS, Kind.METRICS}) | ADMIN_KINDS
# The model field of a multipart form (audio transcriptions), for routing:
# the part's own header lines (as few as there are), a blank line, the value.
FORM_MODEL = re.compile(rb'name="model"\r\n(?:[^\r\n]+\r\n)*?\r\n([^\r\n]{1,256})\r\n')
# What each endpoint cannot do without; vLLM would refuse the request anyway,
# after a cold start.
REQUIRED_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "/v1/chat/completions": ("messages", list),
    "/v1/completions": ("prompt", (str, list)),
    "/v1/embeddings": ("input", (str, list)),
}


@dataclass(frozen=True)
class Engines:
    """What the step knows of the engines: each one's configuration (in the
    configuration's order), which engine serves each model, and the models
    that errors list."""

    configs: Mapping[str, EngineConfig]
    by_model: Mapping[str, str]
    listed_models: Sequence[str]

    @property
    def several(self) -> bool:
        return len(self.configs) > 1

    @property
    def first(self) -> EngineConfig:
        return next(iter(self.configs.values()))


@dataclass(frozen=True)
class Own:
    """One of the gateway's own endpoints (health, status, page, metrics, admin)."""

    kind: Kind


@dataclass(frozen=True)
class ConfiguredModels:
    """GET /v1/models from the configuration: no engine is asked (or started)."""


@dataclass(frozen=True)
class Forward:
    """Send `body` to the engine named `engine`. `parsed` is the JSON body
    (None for other bodies); `model` what the request named."""

    engine: str
    body: bytes
    parsed: dict[str, object] | None
    model: str | None


Step = Own | ConfiguredModels | Forward


def dispatch(route: Route, method: str, body: bytes, engines: Engines, *, first_ready: bool) -> Step:
    """What serves the request; raises the GatewayError to answer instead.
    `first_ready`: the only engine is ready (then it lists its own models)."""
    kind = route.kind
    if kind is Kind.NOT_FOUND:
        raise NotFound(f"vllm-gateway: no such endpoint: {route.path}")
    if kind is Kind.METHOD_NOT_ALLOWED:
        raise MethodNotAllowed(f"vllm-gateway: {method} is not allowed on {route.path}")
    if kind in OWN_KINDS:
        return Own(kind)
    if kind is Kind.MODELS and (engines.several or not first_ready):
        return ConfiguredModels()
    if route.path in JSON_BODY:
        checked = json_object_or_error(body, route.path)
        if isinstance(checked, GatewayError):
            raise checked
        model = checked.get("model")
        cfg = engine_for(model, engines)
        fields = GENERATION.get(route.path)
        if fields is not None:
            body = apply_max_tokens(checked, body, cfg.max_tokens, cfg.max_tokens_policy, fields)
        return Forward(cfg.name, body, checked, model if isinstance(model, str) else None)
    cfg, model_name = engines.first, None
    if engines.several:
        found = FORM_MODEL.search(body)
        if found is not None:
            model_name = found.group(1).decode("utf-8", "replace").strip()
            cfg = engine_for(model_name, engines)
    return Forward(cfg.name, body, None, model_name)


def engine_for(model: object, engines: Engines) -> EngineConfig:
    """The engine that serves `model`: with one engine, that one unless the
    request names a model it does not serve."""
    if not engines.several:
        cfg = engines.first
        if cfg.models and model is not None and model not in cfg.models:
            raise NotFound(
                f"vllm-gateway: the model `{model}` does not exist; available: {', '.join(cfg.models)}"
            )
        return cfg
    if model is None:
        raise BadRequest("vllm-gateway: the request names no `model`; this gateway serves several: "
                         f"{', '.join(engines.listed_models)}")
    name = engines.by_model.get(model) if isinstance(model, str) else None
    if name is None:
        raise NotFound(f"vllm-gateway: the model `{model}` does not exist; available: "
                       f"{', '.join(engines.listed_models)}")
    return engines.configs[name]


def json_object_or_error(body: bytes, path: str = "") -> GatewayError | dict[str, object]:
    """Parse a request body that must be a JSON object; the error to answer otherwise."""
    try:
        # decode first: json.loads(bytes) lets encoded surrogates (invalid
        # UTF-8) through; ValueError covers over-long integers, and
        # RecursionError absurdly deep nesting
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRequest(f"vllm-gateway: the request body is not valid UTF-8: {e}")
    except (ValueError, RecursionError) as e:
        return BadRequest(f"vllm-gateway: the request body is not valid JSON: {str(e)[:200]}")
    if not isinstance(value, dict):
        return BadRequest("vllm-gateway: the request body must be a JSON object")
    need = REQUIRED_FIELDS.get(path)
    if need is not None and not isinstance(value.get(need[0]), need[1]):
        return BadRequest(f"vllm-gateway: the request needs a '{need[0]}' field "
                          f"({'a list' if need[1] is list else 'a string or a list'})")
    return value


def admin_targets(names: Sequence[str], named: str | None, *, all_by_default: bool) -> list[str]:
    """The engines an admin call acts on: the one it names (`?engine=NAME`);
    named none, all of them where the call may cover all (stop, sleep), and
    otherwise the only one there is. With several and none named, a call
    that must name one (start, wake, restart) is an error that lists them."""
    if named is not None:
        if named not in names:
            raise NotFound(f"vllm-gateway: no engine named {named!r}; engines: {', '.join(names)}")
        return [named]
    if all_by_default or len(names) == 1:
        return list(names)
    raise BadRequest(f"vllm-gateway: name the engine with ?engine=NAME; engines: {', '.join(names)}")
