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


def cut_message(engine: str, cause: str, detail: str = "") -> str:
    """What a client whose request was cut by this stop is told."""
    name = repr(engine)
    if cause == "manual":
        what = f"the engine {name} was stopped by vllm-gateway stop"
    elif cause == "yield":
        what = f"the engine {name} yielded the GPU to {detail or 'other work'}"
    elif cause == "evicted":
        what = f"the engine {name} was swapped out to make room for {detail or 'another engine'}"
    elif cause == "dropped":
        what = f"the engine {name} was removed from the configuration"
    elif cause == "external":
        what = f"the engine {name}'s unit was stopped outside the gateway"
    elif cause == "hung":
        what = f"the engine {name} was stopped as hung"
    else:
        what = f"the engine {name} was stopped ({cause})"
    return f"vllm-gateway: {what}; the request was cut"
