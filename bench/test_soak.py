"""Soak as a bench test (not CI: bench/ is outside testpaths): 1,000 SGD steps with fresh
geometry every step; RSS must be flat after warm-up. Run with ``-s`` to see the figures."""
import pytest
from soak import soak


@pytest.mark.parametrize("zero_ground", [False, True], ids=["ground", "zero-ground"])
def test_soak_rss_flat_after_warmup(zero_ground):
    r = soak(1000, 100, 100, zero_ground=zero_ground)
    print(f"\nRSS step 100: {r['warmup_mib']:.1f} MiB, step 1000: {r['end_mib']:.1f} MiB, "
          f"growth {100 * r['growth']:+.2f}%, {r['seconds']:.0f} s")
    assert r["alive_geometries"] == 0, "rulebook caches of past steps are still alive"
    assert r["growth"] <= 0.10, r["rss"]
