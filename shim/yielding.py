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

On a machine with several GPUs, `--gpu 1` takes only GPU 1: only the engines
that run on it (their `gpus`) sleep or stop and are held; the hold file
records the devices in a `gpus=1` line (none: every GPU).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import trio

from . import control, systemd
from .config import GatewayConfig

HOLDER = re.compile(r"[A-Za-z0-9_.@:-]{1,128}")
DEFAULT_HOLDER = "manual"


MAX_GPU_INDEX = 63


@dataclass(frozen=True)
class Hold:
    since: float  # epoch seconds
    gpus: tuple[int, ...] | None  # None: every GPU


def holds_dir() -> Path:
    return control.socket_path().parent / "holds"


def parse_gpus(text: str) -> tuple[int, ...]:
    """"1" or "0,1" -> (0, 1); ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) <= MAX_GPU_INDEX for p in parts):
        raise ValueError(f"GPU indices 0..{MAX_GPU_INDEX} separated by commas, e.g. 1 or 0,1; got {text!r}")
    return tuple(sorted({int(p) for p in parts}))


def hold_text(since: float, gpus: tuple[int, ...] | None) -> str:
    """A hold file's text: the time, and the GPUs when not all."""
    return f"{since:.3f}\n" + ("" if gpus is None else f"gpus={','.join(map(str, gpus))}\n")


def hold_gpus(text: str) -> tuple[int, ...] | None:
    """The GPUs a hold file names; None (every GPU) without a valid gpus= line."""
    for line in text.splitlines():
        if line.startswith("gpus="):
            try:
                return parse_gpus(line.removeprefix("gpus="))
            except ValueError:
                return None
    return None


def affects(gpus: tuple[int, ...] | None, devices: Iterable[int]) -> bool:
    """Whether a hold of `gpus` takes an engine that runs on `devices`."""
    return gpus is None or bool(set(gpus) & set(devices))


def read_hold_details() -> dict[str, Hold]:
    """Who holds which GPUs now."""
    try:
        entries = list(os.scandir(holds_dir()))
    except OSError:
        return {}
    out: dict[str, Hold] = {}
    for e in entries:
        if HOLDER.fullmatch(e.name):
            try:
                out[e.name] = Hold(e.stat().st_mtime, hold_gpus(Path(e.path).read_text()))
            except OSError:  # released meanwhile
                continue
    return out


def read_holds() -> dict[str, float]:
    """Who holds the GPU now: holder -> since (epoch seconds)."""
    return {name: h.since for name, h in read_hold_details().items()}


def _bad_holder(holder: str) -> int:
    print(f"vllm-gateway: --by {holder!r}: use 1-128 letters, digits or ._@:-", file=sys.stderr)
    return 2


def yield_gpu(cfg: GatewayConfig, holder: str, timeout_s: float, gpus: tuple[int, ...] | None = None) -> int:
    if not HOLDER.fullmatch(holder):
        return _bad_holder(holder)
    folder = holds_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / holder).write_text(hold_text(time.time(), gpus))
    t0 = time.monotonic()
    which = "" if gpus is None else f"&gpu={','.join(map(str, gpus))}"
    try:
        answer = trio.run(_ask_shim, f"/gateway/yield?by={quote(holder)}&timeout={timeout_s:g}{which}",
                          timeout_s + 60)
        if answer is None:  # no shim: stop whatever engine still runs there
            trio.run(_stop_engines, cfg, gpus)
    except (OSError, systemd.SystemdError) as e:
        print(f"vllm-gateway: cannot reach the gateway or systemd: {e}", file=sys.stderr)
        return 1
    if answer is not None and answer[0] != 200:
        print(f"vllm-gateway: {answer[1].decode(errors='replace')}", file=sys.stderr)
        return 1
    what = "GPU" if gpus is None else f"GPU {','.join(map(str, gpus))}"
    print(f"{what} yielded to {holder} in {time.monotonic() - t0:.1f} s: no engine holds memory there; "
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


async def _stop_engines(cfg: GatewayConfig, gpus: tuple[int, ...] | None) -> None:
    async with systemd.connect() as sd:
        running = [e for e in cfg.engines.values()
                   if affects(gpus, e.devices) and (await sd.unit_state(e.unit)).running]
        for engine in running:
            await sd.stop_unit(engine.unit)
        deadline = trio.current_time() + max((e.stop_timeout_s for e in running), default=0) + 5
        while running and trio.current_time() < deadline:
            running = [e for e in running if (await sd.unit_state(e.unit)).active_state
                       not in ("inactive", "failed", systemd.GONE)]
            await trio.sleep(0.2)
