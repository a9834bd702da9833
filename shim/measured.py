"""What each engine was measured to hold on its GPUs, kept on disk.

The configured `memory` is a first guess; once an engine ran, the gateway
knows what it really holds awake, and asleep at each sleep level (vLLM keeps
its CUDA context and graphs while asleep). The figures survive the shim's
exits in one JSON file of its own in the user's state folder
($XDG_STATE_HOME/vllm-gateway/measured.json, else
~/.local/state/vllm-gateway/measured.json), keyed by the engine's command
line, which decides what it loads:

    {
      "format": 1,
      "engines": {
        "vllm serve Qwen/Qwen3-8B --gpu-memory-utilization 0.45": {
          "awake": {"0": 11811160064},
          "asleep": {"1": {"0": 6227702579}},
          "updated": 1764726000.0
        }
      }
    }

`awake` and each sleep level map a GPU index to bytes. A file that cannot be
read or parsed is ignored (with a warning) and replaced at the next write.
The pure parts (`engine_key`, `parse`, `render`) do no I/O.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("vllm_gateway.measured")

FORMAT = 1
FILE_NAME = "measured.json"


@dataclass(frozen=True)
class Measured:
    """One engine's figures: bytes per GPU index."""

    awake: Mapping[int, int] = field(default_factory=dict)
    asleep: Mapping[int, Mapping[int, int]] = field(default_factory=dict)  # by sleep level
    updated: float = 0.0

    def with_awake(self, reading: Mapping[int, int], at: float) -> Measured:
        return replace(self, awake=dict(reading), updated=at)

    def with_asleep(self, level: int, reading: Mapping[int, int], at: float) -> Measured:
        return replace(self, asleep={**self.asleep, level: dict(reading)}, updated=at)

    def as_json(self) -> dict[str, Any]:
        return {
            "awake": {str(d): n for d, n in sorted(self.awake.items())},
            "asleep": {str(level): {str(d): n for d, n in sorted(by_gpu.items())}
                       for level, by_gpu in sorted(self.asleep.items())},
            "updated": round(self.updated, 3),
        }


class FormatError(ValueError):
    pass


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vllm-gateway"


def engine_key(command: Sequence[str]) -> str:
    """The command line as a shell would show it: readable, and one key per command."""
    return shlex.join(command)


def _by_gpu(value: Any, where: str) -> dict[int, int]:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: not an object")
    out: dict[int, int] = {}
    for k, n in value.items():
        if not (isinstance(k, str) and k.isdigit()) or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise FormatError(f"{where}: expected GPU index -> bytes, got {k!r}: {n!r}")
        out[int(k)] = n
    return out


def parse(text: str) -> dict[str, Measured]:
    """The file's engines by key; raises FormatError for anything else."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise FormatError(f"not JSON: {e}") from None
    engines = data.get("engines") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(engines, dict):
        raise FormatError(f"expected {{\"format\": {FORMAT}, \"engines\": {{...}}}}")
    out: dict[str, Measured] = {}
    for key, entry in engines.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{key}: not an object")
        asleep = entry.get("asleep", {})
        if not isinstance(asleep, dict) or not all(isinstance(k, str) and k.isdigit() for k in asleep):
            raise FormatError(f"{key}: asleep: expected sleep level -> figures")
        updated = entry.get("updated", 0.0)
        if isinstance(updated, bool) or not isinstance(updated, int | float):
            raise FormatError(f"{key}: updated: not a number")
        out[key] = Measured(
            awake=_by_gpu(entry.get("awake", {}), f"{key}: awake"),
            asleep={int(level): _by_gpu(v, f"{key}: asleep.{level}") for level, v in asleep.items()},
            updated=float(updated),
        )
    return out


def render(engines: Mapping[str, Measured]) -> str:
    body = {"format": FORMAT, "engines": {k: m.as_json() for k, m in sorted(engines.items())}}
    return json.dumps(body, indent=2) + "\n"


class MeasuredStore:
    """The file, read once and written whole (atomically) on every change.
    One writer: the shim's measuring tasks, through `Measurements`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / FILE_NAME
        self.engines: dict[str, Measured] = {}

    def load(self) -> MeasuredStore:
        try:
            self.engines = parse(self.path.read_text())
        except FileNotFoundError:
            self.engines = {}
        except (OSError, UnicodeDecodeError, FormatError) as e:
            log.warning("ignoring %s: %s", self.path, e)
            self.engines = {}
        return self

    def get(self, command: Sequence[str]) -> Measured:
        return self.engines.get(engine_key(command), Measured())

    def put(self, command: Sequence[str], measured: Measured) -> None:
        self.engines[engine_key(command)] = measured
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(render(self.engines))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("cannot keep the measured memory in %s: %s", self.path, e)
