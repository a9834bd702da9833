"""A stand-in for torch in scripts/gpu-check's tests: "VRAM" is resident RAM.

Only what gpu-check's fake engines use: torch.empty(n, dtype, device) on
"cuda", fill_, torch.cuda.synchronize/is_available/device_count. The fake
pynvml beside it reads the RAM back as GPU memory."""

from __future__ import annotations

import mmap

uint8 = "uint8"


class Tensor:
    def __init__(self, n: int) -> None:
        self.mem = mmap.mmap(-1, max(1, n))

    def fill_(self, value: int) -> Tensor:
        chunk = bytes([value]) * (1 << 20)
        for offset in range(0, len(self.mem), len(chunk)):
            n = min(len(chunk), len(self.mem) - offset)
            self.mem[offset:offset + n] = chunk[:n]
        return self


def empty(n: int, dtype: object = None, device: str = "cpu") -> Tensor:
    return Tensor(n)


class cuda:
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def synchronize() -> None:
        return None
