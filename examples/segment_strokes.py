"""Per-site segmentation of KanjiVG characters by stroke type, with the sparse U-Net.

KanjiVG (https://kanjivg.tagaini.net, CC BY-SA 3.0) annotates each stroke of a character
with its type (``kvg:type``: a CJK stroke name such as ``㇐`` horizontal, ``㇑`` vertical,
``㇒`` left-falling, ``㇔`` dot, ``㇏`` right-falling, with variants like ``㇑a``). Each
character is rendered into a grid (``sparsecnn.data.strokes.rasterize``); every active
site is labelled with the type class of the stroke drawn there (the last one drawn where
strokes cross), and ``scn.models.UNet`` learns to predict it from the ink alone. Characters
are split into training and held-out ones; the script reports the per-site accuracy on the
held-out characters and the time per epoch.

    python examples/segment_strokes.py --chars 400 --size 32 --epochs 5

Needs the ``kanjivg`` package (``pip install sparsecnn[kanji]``) and ``scn.Deconvolution``
(the U-Net's decoder).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np

import sparsecnn as scn
from sparsecnn.data import kanjivg
from sparsecnn.data.strokes import rasterize
from sparsecnn.metrics import site_accuracy

#: stroke-type classes: the first character of kvg:type; everything else (hooks, turns,
#: compound strokes) is "other"
CLASSES = ("㇐ horizontal", "㇑ vertical", "㇒ left-falling", "㇔ dot", "㇏ right-falling",
           "other")
_FIRST = {"㇐": 0, "㇑": 1, "㇒": 2, "㇔": 3, "㇏": 4}
IGNORE = -1


def type_class(kvg_type: str | None) -> int:
    """Class of a kvg:type value (IGNORE where the stroke has none)."""
    if not kvg_type:
        return IGNORE
    return _FIRST.get(kvg_type[0], len(CLASSES) - 1)


def stroke_types(path: str) -> list[str | None]:
    """kvg:type of each ``<path>`` with a ``d`` attribute, in document order (the order
    of ``kanjivg.load_character``'s strokes); the attribute's namespace is ignored."""
    out = []
    for elem in ET.parse(path).getroot().iter():
        if not isinstance(elem.tag, str) or elem.tag.rsplit("}", 1)[-1] != "path":
            continue
        if elem.get("d") is None:
            continue
        out.append(next((v for k, v in elem.attrib.items() if k.rsplit("}", 1)[-1] == "type"),
                        None))
    return out


def label_sites(strokes, types, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sites (n, 2) int32 (row, col), one class per site (n,) int64) of a character
    rendered into a size x size grid; a site drawn by several strokes takes the last one's
    class. Sites in row-major order."""
    pix, _, idx = rasterize(strokes, size)
    if len(pix) == 0:
        return np.zeros((0, 2), np.int32), np.zeros(0, np.int64)
    cls = np.array([type_class(t) for t in types], np.int64)[idx]
    flat = pix[:, 0] * size + pix[:, 1]
    last = np.zeros(size * size, np.int64) - 2
    order = np.arange(len(flat))
    last_piece = np.full(size * size, -1, np.int64)
    np.maximum.at(last_piece, flat, order)          # the last piece drawn at each site
    keys = np.nonzero(last_piece >= 0)[0]
    last[keys] = cls[last_piece[keys]]
    sites = np.stack([keys // size, keys % size], 1).astype(np.int32)
    return sites, last[keys]


def load_characters(n: int, size: int, seed: int = 0) -> list[tuple[str, np.ndarray,
                                                                    np.ndarray]]:
    """(character, sites, labels) of n KanjiVG characters (base drawings of the CJK block,
    a seeded random choice), skipping files whose typed paths do not match their strokes."""
    base, _ = kanjivg.kanjivg_index()
    lo, hi = kanjivg.CJK_RANGE
    chars = sorted(c for c in base if lo <= ord(c) <= hi)
    rng = np.random.default_rng(seed)
    out = []
    for c in rng.permutation(chars):
        strokes = kanjivg.load_character(base[c])
        types = stroke_types(base[c])
        if len(types) != len(strokes):
            continue
        sites, labels = label_sites(strokes, types, size)
        if len(sites):
            out.append((str(c), sites, labels))
        if len(out) == n:
            break
    return out


def batch(items, size: int, device: str):
    """A SparseTensor (presence features) of the characters and their labels in row
    order."""
    coords = np.concatenate([np.concatenate([np.full((len(s), 1), b, np.int32), s], 1)
                             for b, (_, s, _) in enumerate(items)])
    labels = np.concatenate([lab for _, _, lab in items])
    feats = np.ones((len(coords), 1), np.float32)
    if device != "cpu":
        coords, feats = (scn.backend.to_device(a, device) for a in (coords, feats))
    x = scn.SparseTensor(coords, feats, (size, size), batch_size=len(items))
    return x, labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=400, help="characters in all")
    ap.add_argument("--held-out", type=float, default=0.2, help="fraction held out")
    ap.add_argument("--size", type=int, default=32, help="grid side (multiple of 4)")
    ap.add_argument("--widths", default="16,32,48", help="U-Net widths per level")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not re.fullmatch(r"\d+(,\d+)*", a.widths):
        ap.error(f"--widths must be comma-separated ints, got {a.widths!r}")
    data = load_characters(a.chars, a.size, a.seed)
    n_test = max(1, int(round(a.held_out * len(data))))
    test, train = data[:n_test], data[n_test:]
    counts = np.bincount(np.concatenate([lab[lab >= 0] for _, _, lab in data]),
                         minlength=len(CLASSES))
    print(f"{len(train)} training and {len(test)} held-out characters, {a.size}x{a.size}; "
          f"sites per class: " + ", ".join(f"{c} {k}" for c, k in zip(CLASSES, counts,
                                                                        strict=True)))
    if not hasattr(scn, "Deconvolution"):
        print("scn.Deconvolution (the U-Net's transposed convolution) is not in this "
              "version of sparsecnn yet: cannot train the U-Net", file=sys.stderr)
        return 2
    widths = [int(w) for w in a.widths.split(",")]
    model = scn.models.UNet(widths, 1, in_channels=1, num_classes=len(CLASSES),
                            seed=a.seed).to(a.device)
    opt = scn.optim.SGD(model.parameters(), a.lr, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(a.seed)
    for epoch in range(a.epochs):
        model.train()
        t0 = time.perf_counter()
        total, n = 0.0, 0
        for i in range(0, len(train), a.batch):
            items = [train[j] for j in rng.permutation(len(train))[i:i + a.batch]]
            x, labels = batch(items, a.size, a.device)
            loss = scn.site_cross_entropy(model(x), labels, ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(items)
            n += len(items)
        dt = time.perf_counter() - t0
        model.eval()
        correct, sites = 0.0, 0
        with scn.no_grad():
            for i in range(0, len(test), a.batch):
                x, labels = batch(test[i:i + a.batch], a.size, a.device)
                k = int((labels != IGNORE).sum())
                correct += site_accuracy(model(x), labels, ignore_index=IGNORE) * k
                sites += k
        print(f"epoch {epoch + 1}: loss {total / max(n, 1):.4f}, held-out per-site accuracy "
              f"{correct / max(sites, 1):.4f}, {dt:.2f} s/epoch ({os.cpu_count()} CPUs, "
              f"{a.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
