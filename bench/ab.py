#!/usr/bin/env python3
"""Interleaved A/B runs of the gateway's figures that one change moves: the
shim from two source trees, measured one after the other, several rounds,
medians printed. On a shared machine single runs move by tens of percent;
alternating the trees and taking medians is what makes a few percent (or a
megabyte) visible.

Each round, for each tree (order alternating by round), with the stand-in
engine behind it:
  load:   the RSS after the usual load (wrk at 32 and 1 connections, 64 and
          1 streams: scripts/bench's sequence, shorter) and p50 at one
          connection, CPU per request
  paced:  paced streams at 64 and 256 (rewriting off, then on in a second
          shim): delay p99, max, stalls, CPU per event, and the RSS idle
          after them with the engine stopped
  direct: the paced streams against the engine itself, the floor (once)

usage: scripts/sandbox -- .venv/bin/python bench/ab.py [--rounds N]
           [--only load,paced] [--starts spread|together] NAME=TREE[:VAR=VALUE,...] NAME=TREE...
TREE is a folder holding a `shim` package (a checkout, or `git archive REV
shim | tar -x -C DIR`); it goes first on the shim's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run


class TreeShim(run.Shim):
    tree: Path = Path()
    env: dict[str, str] = {}  # noqa: RUF012 - set per instance

    def start(self) -> None:
        cfg = self.workdir / f"{self.name}.toml"
        cfg.write_text(
            f'[gateway]\nlisten = "127.0.0.1:{self.port}"\nexit_after = "off"\n'
            f'admin_key = "{run.ADMIN_KEY}"\n'
            f"[engines.main]\ncommand = {json.dumps(self.engine_cmd)}\nport = {self.engine_port}\n"
            f'models = ["bench"]\nunit = "{self.unit}"\nstop_after = "off"\n'
            f'tool_call_format = "{self.fmt}"\nstart_timeout = "60s"\n'
        )
        self.proc = self.procs.start(f"shim-{self.name}", [str(run.SHIM), "--config", str(cfg), "serve"],
                                     env={**run.unit_environment(), "PYTHONPATH": str(self.tree), **self.env})
        run.wait_port(self.port)


def smaps(pid: int, prefix: str) -> dict[str, float]:
    """RSS by kind of mapping, MB: brk heap, anonymous mappings of 1 MB or
    more (pymalloc arenas, malloc's per-thread arenas), smaller anonymous
    ones, and files (the interpreter and its shared libraries)."""
    kinds = {"heap": 0, "anon_big": 0, "anon_small": 0, "files": 0}
    kind = "files"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5] if len(parts) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif not name or name.startswith("[anon"):
                kind = "anon_big" if hi - lo >= 1 << 20 else "anon_small"
            else:
                kind = "files"
        elif parts[0] == "Rss:":
            kinds[kind] += int(parts[1])
    return {f"{prefix}_{k}": v / 1024 for k, v in kinds.items()}


def one(procs: run.Procs, work: Path, name: str, tree: Path, env: dict[str, str], only: set[str],
        secs: float, starts: str) -> dict[str, float]:
    r: dict[str, float] = {}
    if "load" in only or "paced" in only:
        g = TreeShim(procs, work, f"{name}-off", run.engine_cmd())
        g.tree = tree
        g.env = env
        g.start()
        assert g.proc is not None
        pid = g.proc.pid
        r.update(smaps(pid, "start"))
        url = f"http://127.0.0.1:{g.port}"
        try:
            run.check_peer(g.port)
            if "load" in only:
                c32 = run.wrk(url, 32, secs, False, pid)
                c1 = run.wrk(url, 1, secs, False)
                run.loadpy("stream", url, 64, secs, 0.3, False, pid)
                run.loadpy("stream", url, 1, 1.0, 0.3)
                r["rss_load_mb"] = run.rss_mb(pid)[0]
                r.update(smaps(pid, "load"))
                r["p50_1_ms"] = c1["p50_ms"]
                r["cpu_req_us"] = c32.get("cpu_us_per_request", 0.0)
            if "paced" in only:
                for k, v in run.paced(url, paced_d(secs), False, pid, starts).items():
                    r[f"off_{k}"] = v
                r["rss_paced_mb"] = run.rss_mb(pid)[0]
                time.sleep(0.5)
                g.stop_engine()
                time.sleep(0.5)
                r["rss_idle_mb"] = run.rss_mb(pid)[0]
                r.update(smaps(pid, "idle"))
        finally:
            g.stop()
    if "paced" in only:
        gr = TreeShim(procs, work, f"{name}-rw", run.engine_cmd(), fmt="nemotron")
        gr.tree = tree
        gr.env = env
        gr.start()
        assert gr.proc is not None
        try:
            run.check_peer(gr.port, tools=True)
            for k, v in run.paced(f"http://127.0.0.1:{gr.port}", paced_d(secs), True, gr.proc.pid,
                                   starts).items():
                r[f"on_{k}"] = v
        finally:
            gr.stop()
    return r


def paced_d(secs: float) -> run.Durations:
    return run.Durations(chat32=0, chat1=0, stream64=0, stream1=0, warmup=0.3, cold_runs=0, idle_s=0,
                         paced=secs, paced_warmup=1.0, paced_windows=1,
                         settle_s=0.0)


KEYS = [f"{w}_{k}" for w in ("start", "load", "idle") for k in ("heap", "anon_big", "anon_small", "files")]
KEYS += ["rss_load_mb", "p50_1_ms", "cpu_req_us", "rss_paced_mb", "rss_idle_mb"] + [
    f"{side}_p{n}_{k}" for side in ("off", "on") for n in run.PACED_STREAMS
    for k in ("delay_p99_ms", "first_delay_p99_ms", "later_delay_p99_ms", "delay_max_ms", "stalls",
              "cpu_us_per_event")
]


def strays(tree: Path) -> list[str]:
    """What Python would run at every start from the tree's folder, first on
    the path: a sitecustomize or usercustomize (a probe's, left there once,
    read 6 MB more idle RSS for its tree)."""
    return [n for n in ("sitecustomize.py", "usercustomize.py", "sitecustomize", "usercustomize")
            if (tree / n).exists()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="+", metavar="NAME=TREE[:VAR=VALUE,...]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="load,paced")
    ap.add_argument("--seconds", type=float, default=4.0, help="each measured window")
    ap.add_argument("--starts", choices=["spread", "together"], default="together",
                    help="paced streams' starts (bench/load.py)")
    a = ap.parse_args()
    only = set(a.only.split(","))
    trees = []
    for x in a.trees:
        name, _, rest = x.partition("=")
        tree, _, envs = rest.partition(":")
        path = Path(tree).resolve()
        if not (path / "shim").is_dir():
            ap.error(f"{tree}: holds no shim package")
        if stray := strays(path):
            ap.error(f"{tree}: {', '.join(stray)} would run in its shim")
        trees.append((name, path, dict(e.split("=", 1) for e in envs.split(",") if e)))
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-ab."))
    procs = run.Procs(work)
    results: dict[str, list[dict[str, float]]] = {n: [] for n, _, _ in trees}
    direct: dict[str, float] = {}
    try:
        up = run.free_port()
        procs.start("upstream", [*run.engine_cmd(), "--port", str(up)])
        run.wait_port(up)
        if "paced" in only:
            direct = run.paced(f"http://127.0.0.1:{up}", paced_d(a.seconds), False, None, a.starts)
        for i in range(a.rounds):
            for name, tree, env in trees if i % 2 == 0 else trees[::-1]:
                run.log(f"round {i + 1}: {name}")
                r = one(procs, work, name, tree, env, only, a.seconds, a.starts)
                results[name].append(r)
                print(json.dumps({"round": i + 1, "tree": name, **r}), flush=True)
    finally:
        procs.stop_all()
    if direct:
        print("direct:", {k: direct[k] for k in direct if "delay_p99" in k or "stalls" in k})
    print(f"{'figure':34}" + "".join(f"{n:>30}" for n, _, _ in trees))
    for k in KEYS:
        cols = []
        for n, _, _ in trees:
            xs = [r[k] for r in results[n] if k in r]
            cols.append(f"{statistics.median(xs):9.2f} [{' '.join(f'{x:.4g}' for x in xs)}]" if xs else "-")
        if any(c != "-" for c in cols):
            print(f"{k:34}" + "".join(f"{c:>30}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
