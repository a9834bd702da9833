"""The dispatch step, pure: which requests the gateway answers itself, which
engine serves a model (one engine is a fleet of one), the JSON checks and
the max_tokens guardrail, that any body either dispatches or raises the
gateway's own error, and which engines an admin call acts on."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.config import EngineConfig
from shim.dispatch import ConfiguredModels, Engines, Forward, Own, Step, admin_targets, dispatch
from shim.errors import BadRequest, GatewayError, MethodNotAllowed, NotFound
from shim.routes import Kind, classify

MAIN = EngineConfig(name="main", command=("vllm",), models=("m",), max_tokens=100)
ONE = Engines({"main": MAIN}, {"m": "main"}, ["m"])
CODER = EngineConfig(name="coder", command=("vllm",), models=("c1", "c2"), unit="vllm-coder.service")
TWO = Engines({"main": MAIN, "coder": CODER}, {"m": "main", "c1": "coder", "c2": "coder"}, ["m", "c1", "c2"])


def step(method: str, target: str, body: object = None, engines: Engines = ONE, ready: bool = True) -> Step:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return dispatch(classify(method, target), method, raw, engines, first_ready=ready)


def chat(**extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(("method", "target", "kind"), [
    ("GET", "/health", Kind.HEALTH), ("GET", "/gateway/status", Kind.STATUS),
    ("GET", "/metrics", Kind.METRICS), ("POST", "/gateway/stop", Kind.ADMIN_STOP),
    ("GET", "/gateway", Kind.PAGE), ("GET", "/gateway/events", Kind.EVENTS),
])
def test_own_endpoints_reach_no_engine(method: str, target: str, kind: Kind) -> None:
    assert step(method, target) == Own(kind)


def test_unknown_paths_and_methods_are_refused() -> None:
    with pytest.raises(NotFound):
        step("GET", "/no/such")
    with pytest.raises(MethodNotAllowed):
        step("GET", "/v1/chat/completions")


def test_models_come_from_the_configuration_unless_the_only_engine_is_ready() -> None:
    assert step("GET", "/v1/models", ready=False) == ConfiguredModels()
    assert step("GET", "/v1/models", engines=TWO) == ConfiguredModels()
    assert step("GET", "/v1/models") == Forward("main", b"", None, None)


def test_one_engine_takes_a_request_without_a_model_or_with_its_own() -> None:
    for body in (chat(max_tokens=5), chat(model="m", max_tokens=5)):
        got = step("POST", "/v1/chat/completions", body)
        assert isinstance(got, Forward) and got.engine == "main" and got.parsed == body
    with pytest.raises(NotFound, match="`other` does not exist; available: m"):
        step("POST", "/v1/chat/completions", chat(model="other"))


def test_several_engines_route_by_model_and_need_one() -> None:
    got = step("POST", "/v1/chat/completions", chat(model="c2"), engines=TWO)
    assert isinstance(got, Forward) and (got.engine, got.model) == ("coder", "c2")
    with pytest.raises(BadRequest, match="names no `model`; this gateway serves several: m, c1, c2"):
        step("POST", "/v1/chat/completions", chat(), engines=TWO)
    with pytest.raises(NotFound):
        step("POST", "/v1/chat/completions", chat(model=["c1"]), engines=TWO)


def test_a_form_names_its_model_for_routing() -> None:
    form = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nc1\r\n--b--\r\n')
    assert step("POST", "/v1/audio/transcriptions", form, engines=TWO) == Forward("coder", form, None, "c1")
    assert step("POST", "/v1/audio/transcriptions", form) == Forward("main", form, None, None)


def test_a_form_with_the_model_before_the_file_routes_by_the_model() -> None:
    form = (b'--b\r\nContent-Disposition: form-data; name="model"\r\nContent-Type: text/plain\r\n\r\nc1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--b--\r\n')
    assert step("POST", "/v1/audio/transcriptions", form, engines=TWO) == Forward("coder", form, None, "c1")


def test_the_max_tokens_guardrail_adapts_the_body() -> None:
    got = step("POST", "/v1/chat/completions", chat())
    assert isinstance(got, Forward) and json.loads(got.body)["max_tokens"] == 100
    with pytest.raises(BadRequest, match="over this gateway's limit of 100"):
        step("POST", "/v1/chat/completions", chat(max_tokens=500))
    # an engine without a limit: the body goes as it came
    got = step("POST", "/v1/chat/completions", b'{"model": "c1", "messages": []}', engines=TWO)
    assert isinstance(got, Forward) and got.body == b'{"model": "c1", "messages": []}'


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"prompt": 1}'])
def test_bodies_that_cannot_be_served_are_refused_before_any_engine(body: bytes) -> None:
    with pytest.raises(BadRequest):
        step("POST", "/v1/chat/completions" if body != b'{"prompt": 1}' else "/v1/completions", body)


@given(st.binary(max_size=200), st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                                  "/v1/embeddings", "/v1/audio/transcriptions"]),
       st.booleans())
def test_any_body_dispatches_or_raises_our_error(body: bytes, path: str, several: bool) -> None:
    try:
        got = step("POST", path, body, engines=TWO if several else ONE)
    except GatewayError:
        return
    assert isinstance(got, Forward)


# ---- the engines an admin call acts on ----


@pytest.mark.parametrize("all_by_default", [True, False])
def test_an_admin_call_to_one_engine_needs_no_name(all_by_default: bool) -> None:
    assert admin_targets(["main"], None, all_by_default=all_by_default) == ["main"]
    assert admin_targets(["main"], "main", all_by_default=all_by_default) == ["main"]


def test_an_admin_call_with_several_engines_acts_on_the_one_named() -> None:
    assert admin_targets(["main", "coder"], "coder", all_by_default=True) == ["coder"]
    assert admin_targets(["main", "coder"], "coder", all_by_default=False) == ["coder"]


def test_stop_and_sleep_named_none_act_on_every_engine() -> None:
    assert admin_targets(["main", "coder"], None, all_by_default=True) == ["main", "coder"]


def test_start_with_several_engines_must_name_one() -> None:
    with pytest.raises(BadRequest, match="name the engine with \\?engine=NAME; engines: main, coder"):
        admin_targets(["main", "coder"], None, all_by_default=False)


@pytest.mark.parametrize("names", [["main"], ["main", "coder"]])
def test_an_unknown_engine_is_not_found_with_one_or_several(names: list[str]) -> None:
    with pytest.raises(NotFound, match=f"no engine named 'nope'; engines: {', '.join(names)}"):
        admin_targets(names, "nope", all_by_default=True)
