"""Soak: many SGD steps of a small DeepCNet, fresh geometry every step, resident memory.

Every step draws new random-walk pen strokes (bench/workload.py, seed = step), so every
rulebook is built again, as in training; the step's tensors, rulebooks and autograd graph
must all be freed. RSS (/proc/self/statm) is sampled every ``--every`` steps; the figures
at warm-up and at the end are printed, and the run fails (exit status 1) if RSS grew by more
than ``--bound`` (a fraction) after warm-up, or if the geometries (rulebook caches) of past
steps are still alive.

    python3 bench/soak.py                      # 1,000 steps, warm-up 100, bound 10%
    python3 bench/soak.py --steps 3000 --zero-ground
    python3 -m pytest bench/test_soak.py -s    # the same, as a bench test (not CI)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from workload import generate_workload  # noqa: E402

import sparsecnn as scn  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def soak(steps: int = 1000, warmup: int = 100, every: int = 50, *, l: int = 4, k: int = 16,
         batch: int = 16, zero_ground: bool = False, verbose: bool = True) -> dict:
    """Train ``steps`` SGD steps; returns {"rss": [(step, MiB)], "warmup_mib", "end_mib",
    "growth", "alive_geometries", "seconds", "loss_first", "loss_last"}."""
    size = 3 * 2 ** l
    model = scn.models.DeepCNet(l, k, num_classes=10, activation="vleaky", seed=0)
    model.set_ground_state(not zero_ground)
    opt = scn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    labels_rng = np.random.default_rng(1)
    samples, geoms, losses = [], [], []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        w = generate_workload(seed=step, batch=batch, size=size, region=size * 2 // 3)
        x = scn.SparseTensor(w["coords"], w["features"], (size, size), batch_size=batch)
        loss = scn.cross_entropy(model(x), labels_rng.integers(0, 10, batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.numpy()))
        geoms.append(weakref.ref(x.geometry))
        del x, loss, w
        if step % every == 0 or step == warmup:
            samples.append((step, rss_mib()))
            if verbose:
                print(f"step {step:5d}  RSS {samples[-1][1]:8.1f} MiB  loss {losses[-1]:.3f}  "
                      f"{time.perf_counter() - t0:6.1f} s", flush=True)
    warm = next(m for s, m in samples if s >= warmup)
    end = samples[-1][1]
    # every past step's geometry is gone (the last one may still be referenced by the model's
    # last autograd graph until the next step; allow it)
    alive = sum(r() is not None for r in geoms[:-1])
    return dict(rss=samples, warmup_mib=warm, end_mib=end, growth=(end - warm) / warm,
                alive_geometries=alive, seconds=time.perf_counter() - t0,
                loss_first=float(np.mean(losses[:20])), loss_last=float(np.mean(losses[-20:])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--bound", type=float, default=0.10, help="allowed RSS growth after warm-up")
    ap.add_argument("--zero-ground", action="store_true", help="train with ground_state=False")
    args = ap.parse_args(argv)
    r = soak(args.steps, args.warmup, args.every, zero_ground=args.zero_ground)
    print(f"RSS at step {args.warmup}: {r['warmup_mib']:.1f} MiB; at step {args.steps}: "
          f"{r['end_mib']:.1f} MiB; growth {100 * r['growth']:+.2f}% (bound "
          f"{100 * args.bound:.0f}%); peak {max(m for _, m in r['rss']):.1f} MiB; geometries "
          f"of past steps still alive: {r['alive_geometries']}; {r['seconds']:.1f} s; loss "
          f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    ok = r["growth"] <= args.bound and r["alive_geometries"] == 0
    print("OK" if ok else "FAIL: memory grows after warm-up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
