"""Bounds on the server's work in progress, so that a burst costs bounded memory.

:class:`RequestGate` admits at most ``max_inflight`` requests at once (the next one gets 503 with
``Retry-After``, before its body is read), lets at most ``decode_slots`` of them hold a decoded
image at the same time, and hands freed heap pages back to the OS when the server goes idle
(glibc keeps them otherwise, and the resident size stays at its peak after a burst).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Busy(Exception):
    """Too many requests in flight: answer 503 and ask the client to retry after ``retry_after`` seconds."""

    def __init__(self, detail: str, retry_after: int = 1):
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_memory() -> None:
    """Collect garbage and return the C heap's free pages to the OS (a no-op without glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class RequestGate:
    """Admission and decode limits of one app (used from its event loop only, so counters need no lock).

    Args:
        max_inflight: requests being read, decoded or predicted at once; one more gets :class:`Busy`.
        decode_slots: requests that may decode and preprocess an image at the same time.
        trim_interval_s: at most one :func:`release_memory` per this many seconds, when the last
            request in flight finishes.
    """

    def __init__(self, max_inflight: int = 64, decode_slots: int = 4, trim_interval_s: float = 2.0):
        if max_inflight < 1 or decode_slots < 1:
            raise ValueError(f"--max-inflight ({max_inflight}) and --decode-slots ({decode_slots}) must be at least 1")
        self.max_inflight, self.decode_slots, self.trim_interval_s = max_inflight, decode_slots, trim_interval_s
        self.inflight = 0
        self.refused = 0
        self._slots: asyncio.Semaphore | None = None
        self._last_trim = 0.0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one of the ``max_inflight`` places for the whole request, or raise :class:`Busy`."""
        if self.inflight >= self.max_inflight:
            self.refused += 1
            raise Busy(f"server busy: {self.inflight} requests in progress (--max-inflight {self.max_inflight}); retry shortly")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0 and time.monotonic() - self._last_trim > self.trim_interval_s:
                self._last_trim = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, release_memory)

    @asynccontextmanager
    async def decoding(self) -> AsyncIterator[None]:
        """Wait for one of the ``decode_slots``; the decoded image must not outlive the block."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.decode_slots)
        async with self._slots:
            yield

    def stats(self) -> dict:
        return {"inflight": self.inflight, "max_inflight": self.max_inflight, "decode_slots": self.decode_slots,
                "refused": self.refused}
