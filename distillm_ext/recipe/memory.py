"""Process-wide memory settings of the `distillm` command (it owns its process; the library
never changes them).

FSDP gathers and frees whole parameter groups every micro-batch, and generation and evaluation
allocate and free large activations. glibc's malloc raises its mmap threshold after each large
free (up to 32 MiB) and then serves later blocks below it from its heaps, which it rarely
returns to the system: a rank's resident set creeps up by hundreds of MB above what its tensors
need (bench_scale.py measured 5.3 GB per rank against 4.7 GB with the threshold fixed). A fixed
threshold keeps every block of 1 MiB or more in its own mapping, given back on free.
"""

from __future__ import annotations

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_the_system() -> None:
    """Fixes glibc's mmap threshold at MMAP_THRESHOLD_BYTES; does nothing off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass
