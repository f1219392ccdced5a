"""CPU memory reuse between steps: :func:`reuse_freed_memory`.

Why: a loop's step, searched or trained, makes tensors of the same large sizes at every step. glibc's malloc
serves each block above its mmap threshold (128 KiB at first, adapting up to 32 MiB) with fresh pages from
the system and returns them when the tensor is freed; the kernel then zero-fills every page on first touch.
For a beam search's gates (1,280 hypotheses x 1,024 floats, 5 MiB) that page-faulting costs more than the
elementwise op that fills the tensor: in a plain-PyTorch replica of the G2P search's decoder step, two
thirds of the step's time (the whole search ran 1.12x faster once it was gone; see the README). Keeping freed blocks
in the process and handing them to the next tensors removes it. PyTorch has no caching allocator on
CPU to do this, so it is malloc's settings, process-wide, and a choice for the application: the recipes'
command lines make it; a library import does not.
"""

from __future__ import annotations

import ctypes
import platform

from ..errors import entry_point

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # (glibc's malloc.h)


@entry_point(name="looplift.reuse_freed_memory")
def reuse_freed_memory(limit_mb: int = 1024) -> bool:
    """Keep the CPU memory of freed tensors in this process, up to `limit_mb` MiB of it, for the next tensors,
    instead of handing each large block back to the system and faulting in fresh pages for the next one.

    Process-wide and for the rest of the process: blocks up to `limit_mb` come from malloc's heap, and the
    heap is given back to the system only when more than `limit_mb` of it is free at its end. The same as
    starting Python with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set to `limit_mb` MiB.
    Returns whether it took effect: False where the C library is not glibc (macOS, Windows, musl), whose
    malloc is left as it is."""
    if not isinstance(limit_mb, int) or isinstance(limit_mb, bool) or not 1 <= limit_mb <= 2047:
        raise ValueError(f"reuse_freed_memory: limit_mb must be an integer from 1 to 2047 (MiB), got {limit_mb!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    size = limit_mb << 20
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, size))
