"""`scripts/bench --quick` still works from end to end: every peer measured,
the report and the plots written. The figures themselves are never checked
(speed does not fail a test on a loaded machine); that the benchmark runs is.

It makes its own sandbox; the `sandbox` fixture only gives this test the
tier's rule: skipped where no sandbox can be made, failed under CI.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[1]
PEERS = ["direct", "socket-proxyd", "fastapi+httpx", "vllm-gateway", "vllm-gateway+rewrite"]


def table(report: str, heading: str) -> list[list[str]]:
    """The cells of the rows of the first table under `heading` (header and
    rule left out)."""
    section = report.partition(f"\n## {heading}\n")[2].partition("\n## ")[0]
    lines: list[str] = []
    for line in section.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]


def test_quick_bench_measures_every_peer(sandbox: Sandbox, tmp_path: Path) -> None:
    run = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "- command: `scripts/bench --quick --out" in report
    # the proxying table: a row of 13 figures a peer
    rows = {cells[0]: cells for cells in table(report, "Proxying")}
    for peer in PEERS:
        assert peer in rows, f"{peer} missing from the report"
        assert "not measured" not in rows[peer], rows[peer]
    assert "not measured" not in report and "run stopped early" not in report, report
    # every figure of the gateway's rows is there, errors included (0: the
    # warm-up checks that streams arrive whole)
    for peer in ("vllm-gateway", "vllm-gateway+rewrite"):
        cells = rows[peer]
        assert len(cells) == 14 and "-" not in cells and cells[-1] == "0", cells
    # the paced streams: a row of 13 figures a peer at 64 and at 256 streams,
    # and no stream of the gateway's broken
    paced = table(report, "Paced streams")
    for peer in PEERS:
        for streams in ("64", "256"):
            row = next((c for c in paced if c[0] == peer and c[1] == streams), None)
            assert row is not None, f"{peer} at {streams} paced streams missing from the report"
            assert len(row) == 14 and "not measured" not in row, row
            if peer.startswith("vllm-gateway"):
                assert row[-2] == "0", row
                assert "-" not in row, row
    assert "| CPU per event vs socket-proxyd @256 paced streams (rewrite on) | <= 2.5x |" in report
    assert "| delay added p99 @64 paced streams (rewrite off) | < 1 ms |" in report
    # the paced windows come in rounds over every peer, once all of them are up
    log = run.stderr
    assert "bench: paced streams: 256, round 1 of 1" in log, log[-3000:]
    assert log.index("bench: measuring vllm-gateway+rewrite") < log.index("bench: paced streams: 64, round 1")
    assert "| shim RSS after load |" in report
    assert "| processes left when fully idle | 0 | 0 | PASS |" in report
    assert "cold-start lag over 3 starts" in report
    for png in ("bench-throughput.png", "bench-latency.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG"), png
