"""vllm-gateway: start vLLM when a request comes, stop it when nobody uses it."""

from __future__ import annotations

from . import footprint

footprint.defer()  # before trio is imported anywhere

__version__ = "0.1.0"
