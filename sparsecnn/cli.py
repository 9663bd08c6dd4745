"""Command line: ``sparsecnn <command>`` / ``python -m sparsecnn <command>``.

Commands: info, demo, train, evaluate, predict, show. Argument parsing only; the work is in
sparsecnn.train, sparsecnn.stats and sparsecnn.data.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def cmd_info(args: argparse.Namespace) -> int:
    """Version, OpenMP threads, BLAS, GPU."""
    import scipy

    import sparsecnn
    from sparsecnn import _cpu, backend

    print(f"sparsecnn {sparsecnn.__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"numpy      {np.__version__}   scipy {scipy.__version__}")
    omp = f"yes, {_cpu.max_threads()} threads" if _cpu.USE_OPENMP else "no (single-threaded)"
    print(f"OpenMP     {omp}")
    for b in _cpu.blas_info():
        print(f"BLAS       {b.get('internal_api')} {b.get('version')} "
              f"({b.get('threading_layer')}, {b.get('num_threads')} threads, "
              f"{b.get('architecture')}) {Path(b.get('filepath', '')).name}")
    ok, why = backend.gpu_status()
    print(f"GPU        {'available' if ok else 'not available: ' + why}")
    return 0


def _demo_strokes(char: str | None):
    """A character to draw: KanjiVG if installed, else a seeded synthetic sample."""
    from sparsecnn import data
    try:
        ds = data.load_kanjivg(select=[char or "永"], classes=1)
        return ds.samples[0], f"KanjiVG {ds.class_names[0]!r}"
    except (FileNotFoundError, ValueError, KeyError) as e:
        if char:
            raise SystemExit(f"sparsecnn demo: cannot load {char!r} from KanjiVG: {e}") from None
        ds = data.synthetic_strokes(1, 1, seed=0)
        return ds.samples[0], "a synthetic character (pip install sparsecnn[kanji] for KanjiVG)"


def cmd_demo(args: argparse.Namespace) -> int:
    """Forward a DeepCNet on one drawn character; print the per-layer table."""
    import sparsecnn as scn
    from sparsecnn import data, stats

    model = scn.models.DeepCNet(args.l, args.k, num_classes=10, seed=0)
    n = model.input_size
    strokes, what = _demo_strokes(args.char)
    coords, feats = data.render(strokes, n)
    x = scn.SparseTensor.from_samples([(coords, feats)], (n, n))
    print(f"DeepCNet(l={args.l}, k={args.k}) on {what}, drawn into a {n}x{n} grid "
          f"({x.n_active} active sites, {100 * x.density:.2f}% of the grid)\n")
    rows = stats.layer_stats(model, x)
    print(stats.format_table(rows))
    with scn.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(5):
            model(x.detach())
        dt = (time.perf_counter() - t0) / 5
    sp, de = stats.total_macs(rows)
    print(f"\nforward: {1e3 * dt:.2f} ms for one sample (rulebooks included); "
          f"{de / max(sp, 1):.1f}x fewer multiply-adds than the dense network")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsecnn", description="Spatially-sparse CNNs.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="version, threads, BLAS, GPU")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("demo", help="per-layer active sites and multiply-adds of a DeepCNet")
    s.add_argument("--l", type=int, default=5, help="DeepCNet depth l (input 3*2**l)")
    s.add_argument("--k", type=int, default=32, help="DeepCNet width k")
    s.add_argument("--char", default=None, help="KanjiVG character to draw")
    s.set_defaults(func=cmd_demo)
    try:
        from . import train as _train
        _train.add_commands(sub)
    except ImportError:  # pragma: no cover - train.py not present yet
        pass
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
