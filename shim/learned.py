"""What the gateway learns about an engine, kept across shim restarts.

The shim exits when idle, so whatever it learned in memory would be learned
again, at a user's expense, on the next cold start: that vLLM refuses sleep
mode (a failed start of about 30 s), and how long a start takes. These facts
live in one small JSON file in the user's state directory
(`$XDG_STATE_HOME/vllm-gateway/learned.json`, else
`~/.local/state/vllm-gateway/`), keyed by a hash of the engine's command and
environment; the vLLM version each fact was learned with is kept too, and a
start that reports another version forgets them. A change of either learns
again.

Only the engine's owner task writes an engine's facts. The file is small and
written rarely (after a start), by replacing it whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("vllm_gateway.learned")

FILE_NAME = "learned.json"
# Entries not touched for this long are dropped (commands tried once, long ago).
FORGET_AFTER_S = 180 * 24 * 3600.0
# A reason is one line, short enough for a status table.
MAX_REASON_CHARS = 300

# "vLLM API server version 0.8.5" (older), or the banner of 0.32: "█ ▀▄▀ █  version 0.32.0"
_VERSION = re.compile(r"(?:vLLM API server version|█\s+version)\s+v?(\d+\.\d+[\w.+-]*)")
# vLLM's CPU build: "Value error, Sleep mode is not supported on current platform. [type=value_error, ..."
_SLEEP_REFUSAL = re.compile(r"(sleep mode is not supported[^\[\]|]*)", re.IGNORECASE)
# Traceback decoration that says nothing on its own line: ^^^^, ~~~~, │ ...
_DECORATION = re.compile(r"^[\s^~│|]*$")


@dataclass(frozen=True)
class Facts:
    """What is known about one engine command."""

    sleep_refused: str | None = None  # vLLM refused sleep mode; its reason in one line
    start_s: float | None = None  # the last cold start, from the unit's start to healthy
    vllm_version: str | None = None  # the version these facts were learned with
    at: float = 0.0  # epoch seconds of the last change

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: object) -> Facts:
        if not isinstance(value, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in value.items() if k in known}
        try:
            facts = cls(**kwargs)
        except TypeError:
            return cls()
        ok = (
            (facts.sleep_refused is None or isinstance(facts.sleep_refused, str))
            and (facts.start_s is None or isinstance(facts.start_s, int | float))
            and (facts.vllm_version is None or isinstance(facts.vllm_version, str))
            and isinstance(facts.at, int | float)
        )
        return facts if ok else cls()

    def seen_version(self, version: str | None) -> Facts:
        """The facts after a start that reported `version`: another vLLM
        than the one they were learned with forgets them."""
        if version is None or version == self.vllm_version:
            return self
        if self.vllm_version is None:
            # learned at a start that failed before its version was read
            return replace(self, vllm_version=version)
        return Facts(vllm_version=version, at=time.time())


def engine_key(command: Sequence[str], environment: Mapping[str, str]) -> str:
    """The key of an engine's facts: a change of command or environment learns again."""
    text = json.dumps([list(command), sorted(environment.items())], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "vllm-gateway"


def version_in(lines: Sequence[str]) -> str | None:
    """The vLLM version an engine's start-up lines report."""
    for line in lines:
        found = _VERSION.search(line)
        if found:
            return found.group(1)
    return None


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` as one clean line: traceback decoration dropped, spaces collapsed."""
    parts = [p.strip() for p in re.split(r"[\r\n]+| \| ", text) if not _DECORATION.match(p)]
    line = " | ".join(" ".join(p.split()) for p in parts)
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def sleep_refusal(lines: Sequence[str]) -> str | None:
    """vLLM's reason for refusing sleep mode, from its output, in one line."""
    for line in lines:
        found = _SLEEP_REFUSAL.search(line)
        if found:
            return one_line(found.group(1).strip().rstrip(".") + ".")
    return None


class Store:
    """The facts of every engine, in one JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: nothing is kept (tests)

    @classmethod
    def default(cls) -> Store:
        return cls(state_dir() / FILE_NAME)

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            value = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring %s: %s", self.path, e)
            return {}
        return value if isinstance(value, dict) else {}

    def get(self, key: str) -> Facts:
        return Facts.from_json(self._read().get(key))

    def put(self, key: str, facts: Facts) -> None:
        if self.path is None:
            return
        entries = self._read()
        now = time.time()
        entries = {k: v for k, v in entries.items()
                   if isinstance(v, dict) and now - float(v.get("at") or 0) < FORGET_AFTER_S}
        entries[key] = replace(facts, at=now).as_json()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot keep what was learned about the engine in %s: %s", self.path, e)
