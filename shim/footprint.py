"""The shim's own memory: OpenSSL kept out, start-up's modules let go, and
what a burst left given back.

Keep OpenSSL out of the shim: about 4.5 MB of its ~29 MB at start-up.

The gateway speaks plain HTTP on loopback and a Unix socket, and hashes
only a few small strings, but trio imports `ssl` (for SSLStream) and
`hmac` (for DTLS), and `hmac` imports `_hashlib`: both load libcrypto,
whose start-up (providers, tables) alone leaves ~3.5 MB resident, and
`ssl` brings ~1 MB of its own. `defer()` runs before anything imports
them (shim/__init__.py):

- `ssl` becomes a module that imports the real one at its first use and
  from then on is it; trio only uses it inside SSLStream's methods, which
  the gateway never calls.
- `_hashlib` is marked missing, which hashlib and hmac handle as on a
  Python built without OpenSSL: the same algorithms (sha256 for ETags and
  config digests, compare_digest for keys) from CPython's own code.

A process that had already imported either keeps it as it was.
"""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable


class _DeferredModule(types.ModuleType):
    """Stands in for a module until an attribute is first looked up, then
    imports it and takes its namespace (later lookups find it directly).
    Not importlib.util.LazyLoader: its module loads at any attribute looked
    up, and the import statement itself looks up `__spec__` (Python 3.11),
    so `import ssl` in trio would load OpenSSL at once."""

    def __getattr__(self, name: str) -> object:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


def defer() -> None:
    if "ssl" not in sys.modules:
        stand_in = _DeferredModule("ssl")
        stand_in.__spec__ = importlib.util.find_spec("ssl")
        sys.modules["ssl"] = stand_in
    if "_hashlib" not in sys.modules:
        sys.modules["_hashlib"] = None  # type: ignore[assignment]


def forget(*names: str) -> None:
    """Let modules that only start-up used go: out of sys.modules, and their
    code, classes and what refers only to them collected now (before the
    serving process freezes what start-up made, out of the collector's
    reach). Anything that imports one later gets it afresh."""
    for name in names:
        sys.modules.pop(name, None)
    gc.collect()


# -- memory given back once the gateway idles ------------------------------

@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library has it; looked up at the
    first give-back, not when any command imports this module (trio has
    loaded ctypes by then: no cost to look)."""
    import ctypes

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl has none)
        return None
    return trim


def give_back() -> None:
    """Hand the memory a burst of traffic left free back to the system.

    Streams at once leave their objects' memory free, but kept: the free
    lists (tuples, floats, ...) hold on to some of it, and C's heap keeps
    freed pages among the few live objects of the burst. A full collection
    empties the free lists and malloc_trim releases every free page of the
    heap (~1 MB after 256 streams). Both cost a few milliseconds: this runs
    when the last engine has stopped, not on the request path."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
