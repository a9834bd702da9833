"""The stop policy for requests in flight, as values: which stops wait for
them, and what a client whose request is cut is told.

A stop that somebody asked for (`vllm-gateway stop`, a yield, an eviction,
an engine dropped from the configuration) lets the requests in flight finish
within the engine's `stop_grace`; then the gateway closes its connections to
the engine itself. vLLM waits for open connections before it exits (uvicorn's
graceful shutdown), so without that cut an open stream would keep it alive
until systemd kills it after `stop_timeout`. An idle stop has nothing in
flight; a hung or failed engine is stopped at once.
"""

from __future__ import annotations

# Causes of a stop that wait up to stop_grace for the requests in flight.
GRACEFUL = frozenset({"manual", "yield", "evicted", "dropped"})
# Stops after which a cut request that had no answer yet is sent again (to
# the engine started anew, or swapped back in); after the others it fails.
RETRY_UNANSWERED = frozenset({"external", "evicted"})


# What happened to the engine, by the stop's cause ({detail}: e.g. the holder of the GPU).
_WHAT = {
    "manual": "was stopped by vllm-gateway stop",
    "yield": "yielded the GPU to {detail}",
    "evicted": "was swapped out to make room for {detail}",
    "dropped": "was removed from the configuration",
    "external": "was stopped outside the gateway (its unit was stopped)",
    "hung": "was stopped as hung",
}
_DETAIL_UNKNOWN = {"yield": "other work", "evicted": "another engine"}


def cut_message(engine: str, cause: str, detail: str = "") -> str:
    """What a client whose request was cut by this stop is told."""
    what = _WHAT.get(cause, f"was stopped ({cause})")
    what = what.format(detail=detail or _DETAIL_UNKNOWN.get(cause, ""))
    return f"vllm-gateway: the engine {engine!r} {what}; the request was cut"
