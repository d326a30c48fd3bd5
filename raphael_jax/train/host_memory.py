"""Give freed host memory back to the OS between steps (glibc's ``malloc_trim``).

A long run allocates and frees host buffers around every asynchronous checkpoint (orbax copies the state
to host memory while the next steps run). glibc keeps the freed pages of its heaps, interleaved with live
ones, so the resident set grows with each save although nothing leaks. ``malloc_trim(0)`` returns every
whole free page to the OS. The trainer calls :func:`release_free_memory` at log steps when no save is in
flight; ``bench/rss_long_run.py`` measures the effect (docs/RELIABILITY.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """libc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return free heap pages to the OS; whether anything was released (False without ``malloc_trim``)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
