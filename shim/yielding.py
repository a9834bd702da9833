"""`vllm-gateway yield` and `release`: other GPU work claims the GPU.

A hold is a file named after its holder in the runtime folder, so that it
outlives the shim (which exits when idle) and each holder releases only its
own. The running shim is told over the control socket: it puts every engine
to sleep or stops it, waits until none holds GPU memory, and answers new
requests with a 503 until the last hold is released. A systemd unit takes
the GPU for its lifetime with a drop-in:

    [Service]
    ExecStartPre=-%h/.local/bin/vllm-gateway yield --by %n
    ExecStopPost=-%h/.local/bin/vllm-gateway release --by %n
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote

import trio

from . import control, systemd
from .config import GatewayConfig

HOLDER = re.compile(r"[A-Za-z0-9_.@:-]{1,128}")
DEFAULT_HOLDER = "manual"


def holds_dir() -> Path:
    return control.socket_path().parent / "holds"


def read_holds() -> dict[str, float]:
    """Who holds the GPU now: holder -> since (epoch seconds)."""
    try:
        entries = list(os.scandir(holds_dir()))
    except OSError:
        return {}
    return {e.name: e.stat().st_mtime for e in entries if HOLDER.fullmatch(e.name)}


def _bad_holder(holder: str) -> int:
    print(f"vllm-gateway: --by {holder!r}: use 1-128 letters, digits or ._@:-", file=sys.stderr)
    return 2


def yield_gpu(cfg: GatewayConfig, holder: str, timeout_s: float) -> int:
    if not HOLDER.fullmatch(holder):
        return _bad_holder(holder)
    folder = holds_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / holder).write_text(f"{time.time():.3f}\n")
    t0 = time.monotonic()
    try:
        answer = trio.run(_ask_shim, f"/gateway/yield?by={quote(holder)}&timeout={timeout_s:g}",
                          timeout_s + 60)
        if answer is None:  # no shim: stop whatever engine still runs
            trio.run(_stop_engines, cfg)
    except (OSError, systemd.SystemdError) as e:
        print(f"vllm-gateway: cannot reach the gateway or systemd: {e}", file=sys.stderr)
        return 1
    if answer is not None and answer[0] != 200:
        print(f"vllm-gateway: {answer[1].decode(errors='replace')}", file=sys.stderr)
        return 1
    print(f"GPU yielded to {holder} in {time.monotonic() - t0:.1f} s: no engine holds GPU memory; "
          f"`vllm-gateway release --by {holder}` gives it back")
    return 0


def release(holder: str | None) -> int:
    if holder is not None and not HOLDER.fullmatch(holder):
        return _bad_holder(holder)
    for name in read_holds() if holder is None else [holder]:
        (holds_dir() / name).unlink(missing_ok=True)
    query = "all=1" if holder is None else f"by={quote(holder)}"
    try:
        trio.run(_ask_shim, f"/gateway/release?{query}", 10.0)
    except OSError:
        pass  # no shim: the files were the hold
    left = read_holds()
    still = f"; still held by {', '.join(left)}" if left else ""
    print(f"GPU released by {holder or 'every holder'}{still}")
    return 0


async def _ask_shim(path: str, timeout_s: float) -> tuple[int, bytes] | None:
    return await control.request("POST", path, timeout_s)


async def _stop_engines(cfg: GatewayConfig) -> None:
    async with systemd.connect() as sd:
        running = [e for e in cfg.engines.values() if (await sd.unit_state(e.unit)).running]
        for engine in running:
            await sd.stop_unit(engine.unit)
        deadline = trio.current_time() + max((e.stop_timeout_s for e in running), default=0) + 5
        while running and trio.current_time() < deadline:
            running = [e for e in running if (await sd.unit_state(e.unit)).active_state
                       not in ("inactive", "failed", systemd.GONE)]
            await trio.sleep(0.2)
