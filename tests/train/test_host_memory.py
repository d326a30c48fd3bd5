"""``release_free_memory`` returns freed heap pages glibc would keep (raphael_jax/train/host_memory.py)."""
import platform

import pytest

from raphael_jax.train.host_memory import release_free_memory


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_fragmented_free_pages_go_back_to_the_os():
    blocks = [bytearray(100_000) for _ in range(2000)]  # 200 MB from the heap (below the mmap threshold)
    keep = blocks[::10]  # every tenth stays alive: the freed 180 MB lie between live blocks
    del blocks
    before = _rss_mib()
    assert release_free_memory()
    after = _rss_mib()
    assert before - after > 100, (before, after)  # glibc alone keeps them resident
    assert len(keep) == 200
