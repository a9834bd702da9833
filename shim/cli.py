"""The `vllm-gateway` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from . import __version__, config, control, idle_check, listen, systemd
from .engine import Engine
from .notify import Notifier
from .server import Gateway

log = logging.getLogger("vllm_gateway")


async def serve(cfg: config.GatewayConfig) -> None:
    notifier = Notifier()
    async with systemd.connect() as sd:
        gateway: Gateway | None = None

        def on_change() -> None:
            if gateway is not None:
                gateway.publish_status()

        engine = Engine(cfg.engine, sd, on_change)
        gateway = Gateway(cfg, engine, notifier)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            listeners = await listen.listeners(cfg.listen_host, cfg.listen_port)
            control_listener = await control.listener()
            nursery.start_soon(gateway.status_loop)
            serving = trio.CancelScope()
            nursery.start_soon(gateway.exit_when_idle, serving)
            notifier.ready()
            log.info("vllm-gateway %s serving; engine %s is %s",
                     __version__, cfg.engine.name, engine.state.value)
            with serving:
                async with trio.open_nursery() as servers:
                    servers.start_soon(trio.serve_listeners, gateway.handle, [control_listener])
                    await trio.serve_listeners(gateway.handle, listeners)
            notifier.stopping()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway",
        description="Start vLLM when a request comes, stop it when nobody uses it.",
        epilog="example: systemctl --user enable --now vllm-gateway.socket",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--config", help="configuration file (default: $VLLM_GATEWAY_CONFIG or "
                        "~/.config/vllm-gateway/config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the gateway (what the systemd unit runs; the default)")
    sub.add_parser("idle-check", help="stop the engine if idle past its threshold (run by the timer)")
    cfg_p = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg_p.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("check", help="validate the configuration and print the effective values",
                       epilog="example: vllm-gateway config check")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = config.load(Path(args.config) if args.config else None)
    except config.ConfigError as e:
        print(f"vllm-gateway: {e}", file=sys.stderr)
        return 78  # EX_CONFIG: systemd records it; Restart=on-failure backs off

    if args.command == "idle-check":
        return trio.run(idle_check.run, cfg.engine)
    if args.command == "config":
        for name, eng in cfg.engines.items():
            print(f"[engines.{name}]")
            for key, value in vars(eng).items():
                print(f"  {key} = {value!r}")
        print(f"listen = {cfg.listen_host}:{cfg.listen_port}; exit_after_s = {cfg.exit_after_s}")
        return 0
    trio.run(serve, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
