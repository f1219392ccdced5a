"""looplift.reuse_freed_memory: large tensors come from malloc's heap, not fresh pages (on glibc)."""

import platform
import subprocess
import sys

import pytest

import looplift as ll
from looplift.errors import LoopliftError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A fresh process allocates a 16 MiB tensor and reports how much of malloc's memory is mmapped blocks
# (mallinfo2's hblkhd) while it is alive: glibc's default serves it with mmap, after reuse_freed_memory the heap.
PROBE = """
import ctypes, sys, torch
import looplift as ll
from looplift.errors import LoopliftError

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = ll.reuse_freed_memory() if sys.argv[1] == "reuse" else None
before = libc.mallinfo2().hblkhd
x = torch.ones(4 << 20)   # 16 MiB
print(applied, libc.mallinfo2().hblkhd - before, float(x.sum()))
"""


def probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_large_tensors_come_from_the_heap():
    applied, mmapped, total = probe("default")
    assert int(mmapped) >= 16 << 20 and float(total) == 4 << 20   # (the default: a block of its own)
    applied, mmapped, total = probe("reuse")
    assert applied == "True" and int(mmapped) == 0 and float(total) == 4 << 20


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", ""))
    assert ll.reuse_freed_memory() is False


@pytest.mark.parametrize("bad", [0, -5, 2048, 1.5, True, "64"])
def test_bad_limit_is_an_error_naming_it_and_the_line(bad):
    with pytest.raises(ValueError, match=r"limit_mb must be an integer from 1 to 2047 \(MiB\), got") as e:
        ll.reuse_freed_memory(bad)
    assert isinstance(e.value, LoopliftError) and "test_memory.py" in str(e.value)
