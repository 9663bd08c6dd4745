"""Benchmark workload: random-walk pen strokes ("handwriting-like" sparse 2D input).

A copy of the project's shared generator (shared/workloads/strokes_workload.py), so that
bench/ runs without ../shared; generate_workload(0, 64, 96, 64) reproduces
handwriting_b64_s96.npz bit for bit (11,808 active sites; checked in test_bench_net.py).

The peer figures quoted in issues (PyTorch dense, spconv, SparseConvNet, MinkowskiEngine on CPU;
PyTorch/cuDNN dense on an H100) were measured on exactly these inputs:
  python strokes_workload.py OUT.npz [--seed 0 --batch 64 --size 96 --region 64]
File format (npz): coords int32 (N, 3) = (batch, y, x), unique and sorted; features float32 (N, 1),
all ones; spatial_size int64 (2,); batch_size int64 (); seed int64 ().
handwriting_b64_s96.npz here is seed 0, batch 64, size 96, region 64 (11,808 active sites).
For the GPU figures: batch 100, size 192, region 128 (DeepCNet l=6) and batch 64/100, size 96.
"""
import numpy as np

_DIRS = np.array([(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)])


def generate_workload(seed=0, batch=64, size=96, region=64):
    """Random-walk pen strokes: per sample 3-6 strokes, each 20-60 unit moves
    (8-neighbour moves with direction persistence, like a pen), all inside the
    central region x region box of a size x size grid."""
    rng = np.random.default_rng(seed)
    lo = (size - region) // 2
    hi = lo + region - 1
    coords = []
    for b in range(batch):
        img = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(3, 7))):
            y, x = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            d = int(rng.integers(8))
            img[y, x] = True
            for _ in range(int(rng.integers(20, 61))):
                d = (d + int(rng.choice([-1, 0, 0, 0, 1]))) % 8
                ny, nx = y + _DIRS[d][0], x + _DIRS[d][1]
                if not (lo <= ny <= hi and lo <= nx <= hi):  # bounce off the box
                    d = (d + 4) % 8
                    ny, nx = y + _DIRS[d][0], x + _DIRS[d][1]
                y = min(max(int(ny), lo), hi)  # a bounce in a corner can still leave
                x = min(max(int(nx), lo), hi)  # the box along the other axis: clip
                img[y, x] = True
        ys, xs = np.nonzero(img)
        coords.append(np.stack([np.full_like(ys, b), ys, xs], 1))
    coords = np.concatenate(coords).astype(np.int32)
    feats = np.ones((coords.shape[0], 1), dtype=np.float32)
    return dict(coords=coords, features=feats, spatial_size=np.array([size, size]),
                batch_size=np.array(batch), seed=np.array(seed))
