"""What a reload changes: differences between configurations, and what
applies at once, at an engine's restart, or at the gateway's."""

from __future__ import annotations

import dataclasses

from shim import confdiff
from shim.confdiff import Change
from shim.config import GatewayConfig, parse

BASE = {
    "gateway": {"max_waiting": 10, "api_keys": ["sk-one-key-123"]},
    "engines": {"main": {"command": ["vllm", "serve", "m"], "models": ["m"], "stop_after": "10m"}},
}


def config(**changes: object) -> dict[str, object]:
    """BASE with `engine_KEY=` / `gateway_KEY=` replaced (None removes the key)."""
    out = {"gateway": dict(BASE["gateway"]), "engines": {"main": dict(BASE["engines"]["main"])}}
    for key, value in changes.items():
        where, _, name = key.partition("_")
        table = out["gateway"] if where == "gateway" else out["engines"]["main"]
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
    return out


def test_no_change_is_an_empty_plan() -> None:
    cfg = parse(config())
    plan = confdiff.plan(cfg, parse(config()), running={"main"})
    assert plan.changes == () and plan.restart == {} and plan.later == ()
    assert plan.config == cfg


def test_thresholds_limits_and_formats_apply_at_once_to_a_running_engine() -> None:
    old = parse(config())
    new = parse(config(engine_stop_after="3m", engine_tool_call_format="hermes", gateway_max_waiting=5))
    plan = confdiff.plan(old, new, running={"main"})
    assert [c.describe() for c in plan.changes] == [
        "engines.main.stop_after_s: 600.0 -> 180.0",
        'engines.main.tool_call_format: "off" -> "hermes"',
        "gateway.max_waiting: 10 -> 5",
    ]
    assert plan.restart == {} and plan.later == ()
    assert plan.config.engines["main"].stop_after_s == 180.0
    assert plan.config.max_waiting == 5


def test_keys_show_as_changed_but_never_in_clear() -> None:
    old = parse(config())
    new = parse(config(gateway_api_keys=["sk-two-key-456"]))
    [change] = confdiff.plan(old, new, running=()).changes
    assert change.key == "gateway.api_keys"
    assert "sk-" not in change.describe() and "(secret " in change.describe()
    assert confdiff.plan(old, new, running=()).config.api_keys == ("sk-two-key-456",)


def test_a_running_engine_keeps_its_command_line_until_restarted() -> None:
    old = parse(config())
    new = parse(config(engine_command=["vllm", "serve", "other"], engine_stop_after="1m"))
    plan = confdiff.plan(old, new, running={"main"})
    now = plan.config.engines["main"]
    assert now.command == ("vllm", "serve", "m")  # what runs
    assert now.stop_after_s == 60.0  # the threshold applies at once
    assert plan.restart["main"].command == ("vllm", "serve", "other")
    assert plan.summary()["restart_when_idle"] == ["main"]


def test_a_stopped_engine_takes_its_new_command_line_at_once() -> None:
    old = parse(config())
    new = parse(config(engine_port=8200))
    plan = confdiff.plan(old, new, running=())
    assert plan.restart == {} and plan.config.engines["main"].port == 8200


def test_sleep_mode_turned_on_waits_for_the_restart() -> None:
    # the engine was started without --enable-sleep-mode: it cannot sleep yet
    old = parse(config())
    plan = confdiff.plan(old, parse(config(engine_sleep_after="2m")), running={"main"})
    assert plan.config.engines["main"].sleep_after_s is None
    assert plan.restart["main"].sleep_after_s == 120.0
    # turned off, it applies at once (the flag does no harm)
    on = parse(config(engine_sleep_after="2m"))
    plan = confdiff.plan(on, parse(config()), running={"main"})
    assert plan.restart == {} and plan.config.engines["main"].sleep_after_s is None


def test_what_only_the_gateways_restart_applies_is_said_and_kept() -> None:
    old = parse(config())
    new = parse({**config(engine_unit="other.service"), "gateway": {
        **BASE["gateway"], "listen": "127.0.0.1:9000"}})
    new = dataclasses.replace(new, engines={**new.engines, "extra": dataclasses.replace(
        new.engines["main"], name="extra", port=8101, models=("x",), unit="vllm-extra.service")})
    plan = confdiff.plan(old, new, running={"main"})
    later = {c.key for c in plan.later}
    assert {"engines.main.unit", "gateway.listen_port", "engines.extra.command"} <= later
    assert set(plan.config.engines) == {"main"}
    assert plan.config.engines["main"].unit == "vllm.service"
    assert plan.config.listen_port == 8000


def test_a_removed_engine_is_served_until_the_gateway_restarts() -> None:
    two = parse({"engines": {"a": {"command": ["x"], "models": ["a"]},
                             "b": {"command": ["y"], "models": ["b"]}}})
    one = parse({"engines": {"a": {"command": ["x"], "models": ["a"]}}})
    plan = confdiff.plan(two, one, running=())
    assert set(plan.config.engines) == {"a", "b"}
    removed = [c for c in plan.changes if c.key.startswith("engines.b.")]
    assert removed and all(c in plan.later for c in removed)
    # with one engine left, its default unit would change: that waits too
    assert Change("engines.a.unit", '"vllm-a.service"', '"vllm.service"') in plan.later


def test_diff_of_flat_configurations() -> None:
    assert confdiff.diff({"a": "1", "b": "2"}, {"b": "3", "c": "4"}) == [
        Change("a", "1", None), Change("b", "2", "3"), Change("c", None, "4")]
    assert [c.describe() for c in confdiff.diff({"a": "1"}, {"c": "4"})] == [
        "a: removed (was 1)", "c: added (4)"]


def test_flatten_names_every_key_and_leaves_out_the_source() -> None:
    flat = confdiff.flatten(parse(config(), "/etc/x.toml"))
    assert flat["engines.main.command"] == '["vllm", "serve", "m"]'
    assert "gateway.source" not in flat and "engines.main.name" not in flat
    assert flat["gateway.admin_key"] == "(none)"


def test_gpus_and_fake_gpus_are_read_when_the_gateway_starts() -> None:
    def with_gpus(gpus: list[int], memory: str) -> GatewayConfig:
        return parse({"gateway": {"fake_gpu": {"devices": [{"slice": "g0.slice", "memory": memory},
                                                           {"slice": "g1.slice", "memory": "1GiB"}]}},
                      "engines": {"main": {"command": ["x"], "models": ["m"], "gpus": gpus}}})
    old, new = with_gpus([0], "1GiB"), with_gpus([1], "2GiB")
    flat = confdiff.flatten(new)
    assert '"g1.slice"' in flat["gateway.fake_gpus"]
    plan = confdiff.plan(old, new, running=("main",))
    later = {c.key for c in plan.later}
    assert {"engines.main.gpus", "gateway.fake_gpus"} <= later
    # the running engine keeps its devices, so it is not restarted for them
    assert plan.restart == {}
    assert plan.config.engines["main"].gpus == (0,)
