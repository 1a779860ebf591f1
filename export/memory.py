"""Freed memory handed back to the system, so that an export's peak is one copy of the weights.

Why: PyTorch allocates each tensor with the C library's malloc. glibc serves blocks under its
mmap threshold (which grows to 32 MB after large blocks are freed) from its heap, and a freed
heap block stays resident until the heap is trimmed. A 124M model's weight matrices are all
under 32 MB, so letting the PyTorch reference go freed a third of its bytes until `malloc_trim`.
Tracing also leaves reference cycles that hold the module until the collector runs.
"""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> None:
    """Collect unreachable objects, then return the C heap's free pages to the system (glibc;
    elsewhere the collection alone)."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
