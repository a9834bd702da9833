"""The `vllm-gateway` command."""

from __future__ import annotations

import functools
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import (
    __version__,
    commands,
    config,
    control,
    events,
    footprint,
    idle_check,
    listen,
    logsetup,
    reloading,
    startcheck,
    systemd,
    yielding,
)
from .engine import Engine
from .errors import GatewayError
from .fleet import Fleet, probe_for, stop_orphans
from .meter import measurements_for
from .notify import Notifier
from .server import Gateway

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("vllm_gateway")


async def serve(cfg: config.GatewayConfig) -> None:
    notifier = Notifier()
    async with systemd.connect() as sd:
        gateway: Gateway | None = None

        fleet: Fleet | None = None

        def on_change() -> None:
            if gateway is not None:
                gateway.engine_changed()  # the status loop publishes it
            if fleet is not None:
                fleet.engine_changed()

        def on_event(name: str, event: events.EngineEvent) -> None:
            if gateway is not None:
                gateway.engine_event(name, event)

        await stop_orphans(sd, cfg)
        engines = {name: Engine(e, sd, on_change, slice=cfg.engine_slice(e),
                                on_event=functools.partial(on_event, name))
                   for name, e in cfg.engines.items()}
        probes = probe_for(cfg, sd)
        fleet = Fleet(cfg, engines, probes, measurements_for(cfg, sd, probes))
        gateway = Gateway(cfg, fleet, notifier)
        async with trio.open_nursery() as nursery:
            for engine in engines.values():
                await nursery.start(engine.run)
            nursery.start_soon(fleet.run)
            listeners = await listen.listeners(cfg.listen_host, cfg.listen_port)
            control_listener = await control.listener()
            nursery.start_soon(gateway.status_loop)
            nursery.start_soon(reload_on_sighup, gateway)
            serving = trio.CancelScope()
            nursery.start_soon(gateway.exit_when_idle, serving)
            # What start-up made (modules, classes, the configuration: ~30,000
            # objects) lives as long as the shim: out of the cyclic collector's
            # reach, whose full passes over it stalled every relayed stream.
            gc.freeze()
            notifier.ready()
            log.info("vllm-gateway %s serving; %s", __version__, ", ".join(
                f"engine {e.cfg.name} is {e.state.value}" for e in engines.values()))
            with serving:
                async with trio.open_nursery() as servers:
                    servers.start_soon(trio.serve_listeners, gateway.handle, [control_listener])
                    await trio.serve_listeners(gateway.handle, listeners)
            notifier.stopping()
            nursery.cancel_scope.cancel()


async def reload_on_sighup(gateway: Gateway) -> None:
    """SIGHUP reloads the configuration, as `vllm-gateway reload` does."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                reloading.reload(gateway)
            except GatewayError:
                pass  # refused: the journal says why


USER_COMMANDS = ("status", "start", "stop", "sleep", "wake", "restart", "reload", "logs", "yield", "release")


def _parser() -> argparse.ArgumentParser:
    # imported here, not with the module: the serving process lets it go
    # once its command line is read (see main)
    import argparse

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="vllm-gateway",
        description="Start vLLM when a request comes, stop it when nobody uses it.",
        epilog="examples:\n  systemctl --user enable --now vllm-gateway.socket\n  vllm-gateway status",
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--config", help="configuration file (default: $VLLM_GATEWAY_CONFIG or "
                        "~/.config/vllm-gateway/config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=raw,
                              epilog=f"example:\n  {example}")

    st = command("status", "show the gateway's and the engine's state, idle time and memory",
                 "vllm-gateway status --json | jq .state")
    st.add_argument("--json", action="store_true",
                    help="print what GET /gateway/status answers (built from systemd when the "
                    "gateway does not run)")
    for name, help, example in (
        ("start", "start the engine now and wait until it is ready (starts the gateway too)",
         "vllm-gateway start   # engine ready in 41.2 s (pid 4242)"),
        ("stop", "stop the engine now (its GPU memory is freed); with several, all unless named",
         "vllm-gateway stop    # engine stopped in 1.3 s"),
        ("sleep", "put the engine to sleep now (needs sleep_after); with several, all unless named",
         "vllm-gateway sleep   # engine asleep in 0.4 s (level 1)"),
        ("wake", "wake the sleeping engine now",
         "vllm-gateway wake    # engine awake in 1.5 s (pid 4242)"),
        ("restart", "stop the engine and start it again (with a reloaded command line)",
         "vllm-gateway restart main   # engine restarted in 45.0 s (pid 4343)"),
    ):
        command(name, help, example).add_argument(
            "engine", nargs="?", default=None, help="the engine's name, with several engines")
    yl = command("yield", "free the GPU for other work: every engine sleeps or stops, and none "
                 "starts until released", "vllm-gateway yield --by game.service")
    yl.add_argument("--by", default=yielding.DEFAULT_HOLDER, help="who holds the GPU (default: manual)")
    yl.add_argument("--gpu", type=_gpus, default=None, metavar="N[,N]",
                    help="take only these GPUs: only engines that run on them make room (default: all)")
    yl.add_argument("--timeout", type=float, default=120.0, metavar="S",
                    help="wait this long for requests in flight, then stop the engines (default: 120)")
    rl = command("release", "end a hold of `vllm-gateway yield`: engines start again on demand",
                 "vllm-gateway release --by game.service")
    rl.add_argument("--by", default=yielding.DEFAULT_HOLDER, help="whose hold to end (default: manual)")
    rl.add_argument("--all", action="store_true", help="end every hold")
    lg = command("logs", "show the gateway's and the engine's journal, interleaved by time",
                 "vllm-gateway logs -f -n 100")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.add_argument("-n", "--lines", type=int, default=None, metavar="N", help="show the last N lines")
    command("reload", "apply the configuration file to the running gateway (refused if it has errors)",
            "vllm-gateway reload   # or: systemctl --user reload vllm-gateway")
    command("serve", "run the gateway (what the systemd unit runs; the default)",
            "vllm-gateway --config ./config.toml serve")
    command("idle-check", "sleep or stop the engine if idle past its thresholds (run by the timer)",
            "systemctl --user list-timers vllm-gateway-idle.timer")
    cfg_p = command("config", "configuration commands", "vllm-gateway config check")
    cfg_sub = cfg_p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cfg_sub.add_parser("check", help="validate the configuration and print the effective values",
                       description="Validate the configuration and print the effective values.",
                       formatter_class=raw,
                       epilog="example:\n  VLLM_GATEWAY_CONFIG=./config.toml vllm-gateway config check")
    return parser


def _gpus(text: str) -> tuple[int, ...]:
    try:
        return yielding.parse_gpus(text)
    except ValueError as e:
        import argparse

        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    logsetup.configure(args.verbose)
    try:
        cfg = config.load(Path(args.config) if args.config else None)
    except config.ConfigError as e:
        if args.command not in USER_COMMANDS:
            print(f"vllm-gateway: {e}", file=sys.stderr)
            return 78  # EX_CONFIG: systemd records it; Restart=on-failure backs off
        # status, stop and logs must work with a broken file too: the defaults name the units
        print(f"vllm-gateway: warning: {e}; using the default engine settings", file=sys.stderr)
        cfg = config.GatewayConfig(engines={"main": config.EngineConfig(name="main", command=())})

    if args.command == "status":
        return commands.status(cfg, args.json)
    if args.command in ("start", "stop", "sleep", "wake", "restart"):
        return commands.manual(cfg, args.command, args.engine)
    if args.command == "reload":
        return commands.reload()
    if args.command == "yield":
        return yielding.yield_gpu(cfg, args.by, args.timeout, args.gpu)
    if args.command == "release":
        return yielding.release(None if args.all else args.by)
    if args.command == "logs":
        return commands.logs([e.unit for e in cfg.engines.values()], args.follow, args.lines)
    if args.command == "idle-check":
        return trio.run(idle_check.run, cfg)
    if args.command == "config":
        return config_check(cfg)
    # The command line is read: argparse (and the gettext it brings) would
    # stay resident for the gateway's lifetime, ~0.3 MB, for nothing.
    del args
    footprint.forget("argparse", "gettext")
    trio.run(serve, cfg)
    return 0


def config_check(cfg: config.GatewayConfig) -> int:
    print(f"# {cfg.source or config.config_path()}")
    print("[gateway]")
    print(f"  listen = {cfg.listen_host}:{cfg.listen_port}")
    print(f"  exit_after_s = {cfg.exit_after_s!r}")
    print(f"  max_waiting = {cfg.max_waiting!r}")
    for name, eng in cfg.engines.items():
        print(f"[engines.{name}]")
        for key, value in vars(eng).items():
            print(f"  {key} = {value!r}")
    for eng in cfg.engines.values():
        path = startcheck.unit_path(eng.env(sleep=eng.sleep_after_s is not None))
        for problem in startcheck.problems(eng.name, eng.argv(sleep=False), path):
            print(f"vllm-gateway: warning: {problem}", file=sys.stderr)
    differences = commands.running_differences(cfg)
    if differences:
        print("# differs from the running gateway's configuration (apply: vllm-gateway reload):")
        print("\n".join(f"#   {line}" for line in differences))
    elif differences is not None:
        print("# the running gateway uses this configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
