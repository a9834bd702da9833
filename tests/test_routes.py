"""Which requests the gateway answers, forwards or refuses; dev endpoints in any spelling."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shim.routes import (
    DEV_ENDPOINTS,
    ENGINE_GET,
    ENGINE_POST,
    OWN,
    Kind,
    Route,
    canonical_path,
    classify,
)

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@pytest.mark.parametrize(("path", "want_kind"), sorted(OWN.items()))
def test_own_endpoints(path: str, want_kind: tuple[str, Kind]) -> None:
    want, kind = want_kind
    assert classify(want, path) == Route(kind, path, "")
    if want == "GET":
        assert classify("HEAD", path).kind is kind
    for method in METHODS:
        if method != want and not (method == "HEAD" and want == "GET"):
            assert classify(method, path).kind is Kind.METHOD_NOT_ALLOWED, method


@pytest.mark.parametrize("path", sorted(ENGINE_POST))
def test_engine_post_endpoints(path: str) -> None:
    assert classify("POST", path) == Route(Kind.ENGINE, path, "")
    for method in METHODS:
        if method != "POST":
            assert classify(method, path).kind is Kind.METHOD_NOT_ALLOWED, method


@pytest.mark.parametrize("path", sorted(ENGINE_GET))
def test_engine_get_endpoints(path: str) -> None:
    assert classify("GET", path) == Route(Kind.ENGINE, path, "")
    assert classify("POST", path).kind is Kind.METHOD_NOT_ALLOWED


@pytest.mark.parametrize(
    "target",
    ["/", "/v1", "/v1/", "/docs", "/openapi.json", "/v1/chat", "/v1/chat/completions/x",
     "/v1/models/extra", "/gateway/nothing", "/gateway/reboot", "/favicon.ico", "*", "/%2e%2e",
     "/v2/chat/completions"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_is_not_found(method: str, target: str) -> None:
    assert classify(method, target).kind is Kind.NOT_FOUND


@pytest.mark.parametrize("name", sorted(DEV_ENDPOINTS))
@pytest.mark.parametrize("method", METHODS)
def test_dev_endpoints_not_found(name: str, method: str) -> None:
    route = classify(method, f"/{name}")
    assert route.kind is Kind.NOT_FOUND
    assert route.path == f"/{name}"


def test_query_kept_raw_and_forwarded() -> None:
    route = classify("POST", "/V1/chat//completions/?a=1&b=%2F")
    assert route == Route(Kind.ENGINE, "/v1/chat/completions", "a=1&b=%2F")
    assert route.target == "/v1/chat/completions?a=1&b=%2F"
    assert classify("GET", "/health").target == "/health"


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("", "/"),
        ("/", "/"),
        ("//", "/"),
        ("///v1//models//", "/v1/models"),
        ("/V1/Models", "/v1/models"),
        ("/v1/./models/.", "/v1/models"),
        ("/v1/../sleep", "/sleep"),
        ("/../../sleep", "/sleep"),
        ("\\v1\\models", "/v1/models"),
        ("/%73leep", "/sleep"),
        ("/%2573leep", "/sleep"),
        ("/%25252573leep", "/sleep"),
        ("/v1%2Fmodels", "/v1/models"),
        ("/v1%252fmodels", "/v1/models"),
        ("/v1%5Cmodels", "/v1/models"),
        ("/v1/%2e%2e/sleep", "/sleep"),
        ("health", "/health"),
    ],
)
def test_canonical_path(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


# ---- any spelling of a dev endpoint ----


def _escape(ch: str, depth: int, upper: bool) -> str:
    """Percent-encode one character `depth` times (depth 0: as is)."""
    out = ch
    for _ in range(depth):
        hexes = [f"%{b:02X}" if upper else f"%{b:02x}" for b in out.encode()]
        out = "".join(hexes)
    return out


@st.composite
def spelled(draw: st.DrawFn, text: str, max_depth: int = 3) -> str:
    """`text` with each character in random case and percent-encoded 0..max_depth times."""
    out = []
    for ch in text:
        if ch.isalpha() and draw(st.booleans()):
            ch = ch.swapcase()
        depth = draw(st.integers(min_value=0, max_value=max_depth))
        out.append(_escape(ch, depth, draw(st.booleans())))
    return "".join(out)


SEP = st.sampled_from(["/", "//", "\\", "/./", "/\\/"])
PREFIX = st.sampled_from(["", "/v1/..", "/v1/chat/../..", "/gateway/..", "/x/y/../..", "/..", "/."])
SUFFIX = st.sampled_from(["", "/", "//", "/.", "/./", "\\", "/x/..", "/%2e"])
QUERY = st.sampled_from(["", "?", "?a=1", "?path=/v1/chat/completions", "?%2F"])


@st.composite
def dev_targets(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(DEV_ENDPOINTS)))
    raw = draw(PREFIX) + draw(SEP) + name + draw(SUFFIX)
    return name, draw(spelled(raw)) + draw(QUERY)


@given(st.sampled_from(METHODS), dev_targets())
@example("POST", ("sleep", "/SLEEP/"))
@example("POST", ("sleep", "/%73leep"))
@example("POST", ("sleep", "/%252Fsleep"))
@example("POST", ("sleep", "/v1/../sleep"))
@example("POST", ("wake_up", "\\wake_up?x=1"))
@example("POST", ("collective_rpc", "//./Collective_RPC//"))
def test_dev_endpoint_in_any_spelling_is_not_found(method: str, name_target: tuple[str, str]) -> None:
    name, target = name_target
    route = classify(method, target)
    assert route.kind is Kind.NOT_FOUND
    assert route.path == f"/{name}"


@given(st.sampled_from(METHODS), dev_targets().map(lambda nt: nt[1]), st.integers(1, 6))
def test_dev_endpoint_encoded_deeper_is_still_never_engine(method: str, target: str, extra: int) -> None:
    deeper = "".join(_escape(ch, extra, True) for ch in target.partition("?")[0])
    assert classify(method, deeper).kind is Kind.NOT_FOUND


# ---- rules for any input ----


@given(st.sampled_from(METHODS), st.text(max_size=60))
def test_any_target_classifies(method: str, target: str) -> None:
    route = classify(method, target)
    assert isinstance(route, Route)
    assert route.path.startswith("/")
    if route.kind is Kind.ENGINE:
        assert route.path in (ENGINE_POST | ENGINE_GET)
        first = route.path.strip("/").split("/", 1)[0]
        assert first not in DEV_ENDPOINTS


@st.composite
def engine_targets(draw: st.DrawFn) -> tuple[str, str]:
    path = draw(st.sampled_from(sorted(ENGINE_POST)))
    return path, draw(spelled(draw(PREFIX) + path + draw(SUFFIX))) + draw(QUERY)


@given(engine_targets())
def test_engine_paths_in_any_spelling_forward_canonically(path_target: tuple[str, str]) -> None:
    path, target = path_target
    route = classify("POST", target)
    assert route.kind is Kind.ENGINE
    assert route.path == path


@pytest.mark.parametrize(("method", "path", "kind"), [
    ("POST", "/gateway/reload", Kind.ADMIN_RELOAD),
    ("POST", "/gateway/restart", Kind.ADMIN_RESTART),
    ("GET", "/gateway/config", Kind.ADMIN_CONFIG),
])
def test_reload_restart_and_config_are_admin_endpoints(method: str, path: str, kind: Kind) -> None:
    assert classify(method, path).kind is kind
    other = "GET" if method == "POST" else "POST"
    assert classify(other, path).kind is Kind.METHOD_NOT_ALLOWED
