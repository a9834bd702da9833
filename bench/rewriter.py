"""Throughput of the streamed tool-call rewriter against a plain pass-through.

Run: python bench/rewriter.py

The baseline splits the same SSE body into events and passes them on, which
is the least a gateway that looks at events has to do. Figures are events per
second over a vLLM-shaped stream fed in upstream-sized reads; the ratio is
rewriter time over baseline time (lower is better).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shim.sse import SSEDecoder
from shim.toolcalls import StreamRewriter, get_format

_FMT = get_format("nemotron")
assert _FMT is not None
FMT = _FMT
READ_BYTES = 4096  # roughly what one socket read brings in a busy stream


def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    obj = {
        "id": "chatcmpl-0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "nvidia/NVIDIA-Nemotron-Nano-9B-v2",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream(pieces: list[str]) -> bytes:
    return (
        chunk({"role": "assistant", "content": ""})
        + b"".join(chunk({"content": p}) for p in pieces)
        + chunk({"content": ""}, "stop")
        + b"data: [DONE]\n\n"
    )


def plain_pieces(n: int) -> list[str]:
    words = "The quick brown fox jumps over the lazy dog, 東京 😀 and then rests.".split(" ")
    return [" " + words[i % len(words)] for i in range(n)]


def tool_pieces(n: int) -> list[str]:
    text = (
        "".join(plain_pieces(n // 2))
        + "<TOOLCALL>"
        + json.dumps(
            [{"name": "get_weather", "arguments": {"city": "Tokyo", "days": i}} for i in range(n // 40)]
        )
        + "</TOOLCALL>"
    )
    size = max(1, len(text) // n)  # about one piece per event, as tokens come
    return [text[i : i + size] for i in range(0, len(text), size)]


def reads(body: bytes) -> list[bytes]:
    return [body[i : i + READ_BYTES] for i in range(0, len(body), READ_BYTES)]


def baseline(parts: list[bytes]) -> int:
    decoder = SSEDecoder()
    sent = 0
    for part in parts:
        sent += len(b"".join(decoder.feed(part)))
    return sent + len(decoder.end())


def rewriter(parts: list[bytes]) -> int:
    rw = StreamRewriter(FMT, "bench")
    sent = 0
    for part in parts:
        sent += len(rw.feed(part))
    return sent + len(rw.end())


def best_of(fn: Callable[[list[bytes]], int], parts: list[bytes], rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(parts)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    n = 20000
    for label, pieces in (("no tool call", plain_pieces(n)), ("with tool calls", tool_pieces(n))):
        body = stream(pieces)
        parts = reads(body)
        events = len(SSEDecoder().feed(body))
        base = best_of(baseline, parts)
        rew = best_of(rewriter, parts)
        print(
            f"{label:16s} {events:6d} events  "
            f"baseline {events / base:12,.0f} ev/s  "
            f"rewriter {events / rew:12,.0f} ev/s  "
            f"ratio {rew / base:5.2f}x"
        )
    # Byte-by-byte feeding, the worst case for the splitter and the rewriter.
    body = stream(tool_pieces(2000))
    parts = [body[i : i + 1] for i in range(len(body))]
    events = len(SSEDecoder().feed(body))
    base = best_of(baseline, parts, 3)
    rew = best_of(rewriter, parts, 3)
    print(
        f"{'byte by byte':16s} {events:6d} events  "
        f"baseline {events / base:12,.0f} ev/s  "
        f"rewriter {events / rew:12,.0f} ev/s  "
        f"ratio {rew / base:5.2f}x"
    )


if __name__ == "__main__":
    main()
