"""Command line: ``sparsecnn <command>`` / ``python -m sparsecnn <command>``.

Commands: info, demo, train, evaluate, predict, show. Argument parsing only; the work is in
sparsecnn.train, sparsecnn.stats and sparsecnn.data.
"""
from __future__ import annotations

import argparse
import json
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
    import os
    omp = (f"yes, {_cpu.max_threads()} threads, GOMP_SPINCOUNT="
           f"{os.environ.get('GOMP_SPINCOUNT', 'default')}" if _cpu.USE_OPENMP
           else "no (single-threaded)")
    print(f"OpenMP     {omp}")
    for b in _cpu.blas_info():
        print(f"BLAS       {b.get('internal_api')} {b.get('version')} "
              f"({b.get('threading_layer')}, {b.get('num_threads')} threads, "
              f"{b.get('architecture')}) {Path(b.get('filepath', '')).name}")
    from sparsecnn._cpu._memory import malloc_tuning_status, tune_malloc
    tune_malloc()
    active, how = malloc_tuning_status()
    print(f"malloc     {'tuned: ' if active else 'not tuned: '}{how}")
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


# -- training commands --------------------------------------------------------------------------
def _load_data(args: argparse.Namespace):
    """(train, test, extra held-out sets) for --data."""
    from sparsecnn import data
    if args.data == "kanjivg":
        sel = args.select
        select = sel if sel in ("first", "kana") else list(sel)
        train = data.load_kanjivg(args.classes, select=select)
        # held out: the same characters drawn with other augmentations, and the variant
        # drawings (-Kaisho etc.) of those characters that KanjiVG has
        return train, train, {"variants": data.load_kanjivg_variants(train)}
    if args.data == "synthetic":
        train = data.synthetic_strokes(args.classes, 20, seed=0)
        return train, data.synthetic_strokes(args.classes, 10, seed=1), {}
    ds = data.load_strokes(args.data)
    # users' strokes come in any units: map every sample into the unit box
    ds = data.StrokeDataset([data.normalize(s) for s in ds.samples], ds.labels,
                            ds.class_names)
    train, test = ds.split(0.8, seed=args.seed)
    return train, test, {}


def cmd_train(args: argparse.Namespace) -> int:
    """Train a DeepCNet/DeepCNiN on stroke data; print held-out accuracy; save the model."""
    import sparsecnn as scn
    from sparsecnn import train as T

    train, test, extra = _load_data(args)
    arch = {"deepcnet": scn.models.DeepCNet, "deepcnin": scn.models.DeepCNiN}[args.arch]
    from sparsecnn.data import num_feature_channels
    cin = num_feature_channels(args.features, args.signature_depth)
    model = arch(args.l, args.k, in_channels=cin, num_classes=train.num_classes,
                 activation=args.activation, dropout=args.dropout,
                 channel_dropout=args.channel_dropout, seed=args.seed)
    n_extra = sum(len(v) for v in extra.values())
    print(f"{type(model).__name__}(l={args.l}, k={args.k}), input {model.input_size}x"
          f"{model.input_size}, {sum(p.data.size for p in model.parameters()):,} parameters; "
          f"{train.num_classes} classes, {len(train)} training drawings x {args.repeats} "
          f"augmented copies per epoch, {len(test)} test drawings"
          + (f", {n_extra} variant drawings" if n_extra else ""), flush=True)
    info = {"class_names": list(train.class_names), "features": args.features,
            "signature_depth": args.signature_depth, "scale": args.scale}
    t0 = time.perf_counter()
    hist = T.fit(model, train, test, extra_eval=extra, checkpoint=args.checkpoint,
                 resume=args.resume, log=args.log, progress=not args.quiet, info=info,
                 epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 lr_decay=args.lr_decay, weight_decay=args.weight_decay,
                 momentum=args.momentum, repeats=args.repeats, features=args.features,
                 signature_depth=args.signature_depth, scale=args.scale, tta=args.tta,
                 seed=args.seed, device=args.device, clip_grad=args.clip_grad,
                 eval_every=args.eval_every, label_smoothing=args.label_smoothing)
    minutes = (time.perf_counter() - t0) / 60
    last = hist[-1]
    scn.save(model, args.out, meta={"kind": "model", "info": info, "history": hist})
    print(f"\ntrained {len(hist)} epochs in {minutes:.1f} min "
          f"({last['samples_per_second']:.0f} samples/s in the last epoch)")
    if "test_accuracy" in last:
        print(f"held-out accuracy (augmented draws of the test set, tta={args.tta}): "
              f"{100 * last['test_accuracy']:.2f}%  top-5 {100 * last['test_top5']:.2f}%")
    if "variants_accuracy" in last:
        print(f"held-out accuracy (variant drawings, {n_extra}): "
              f"{100 * last['variants_accuracy']:.2f}%  top-5 {100 * last['variants_top5']:.2f}%")
    print(f"model saved to {args.out}")
    return 0


def _load_model(path: str):
    from sparsecnn import io
    model, _, meta = io.load_file(path)
    info = meta.get("info", {})
    return model, info


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Accuracy of a saved model on held-out data."""
    from sparsecnn import train as T
    model, info = _load_model(args.model)
    args.classes = getattr(model, "num_classes", args.classes)
    _, test, extra = _load_data(args)
    kw = dict(tta=args.tta, features=info.get("features", "presence"),
              signature_depth=info.get("signature_depth", 2), scale=info.get("scale"),
              device=args.device, progress=not args.quiet)
    for name, ds in {"test": test, **extra}.items():
        if len(ds):
            aug = name == "test" or args.tta > 1   # variants: as drawn unless tta
            r = T.evaluate(model, ds, augment=aug, **kw)
            print(f"{name:<9} n={r['n']:<6} accuracy {100 * r['accuracy']:.2f}%  top-5 "
                  f"{100 * r['top5']:.2f}%  loss {r['loss']:.4f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-5 classes with probabilities for strokes in a JSON file."""
    from sparsecnn import train as T
    from sparsecnn.data import normalize
    model, info = _load_model(args.model)
    doc = json.loads(Path(args.strokes).read_text())
    samples = doc if isinstance(doc, list) and doc and isinstance(doc[0], dict) else [doc]
    strokes = []
    for i, smp in enumerate(samples):
        raw = smp.get("strokes") if isinstance(smp, dict) else smp
        try:
            strokes.append(normalize([np.asarray(s, dtype=np.float64).reshape(-1, 2)
                                      for s in raw]))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"sparsecnn predict: sample {i} of {args.strokes} is not a list "
                             f"of strokes [[x, y], ...]: {e}") from None
    probs = T.predict(model, strokes, tta=args.tta, features=info.get("features", "presence"),
                      signature_depth=info.get("signature_depth", 2), scale=info.get("scale"),
                      device=args.device)
    names = info.get("class_names") or [str(i) for i in range(probs.shape[1])]
    out = []
    for p in probs:
        top = np.argsort(-p)[:args.top]
        out.append([{"class": names[j], "index": int(j), "probability": float(p[j])}
                    for j in top])
    print(json.dumps(out if len(out) > 1 else out[0], ensure_ascii=False, indent=1))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """PNG of the active sites per layer for one input (the paper's Figure 2) and curves."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("sparsecnn show needs matplotlib: pip install sparsecnn[plot]") from None
    import sparsecnn as scn
    from sparsecnn import data
    from sparsecnn.autograd import no_grad

    if args.model:
        model, info = _load_model(args.model)
    else:
        model, info = scn.models.DeepCNet(args.l, args.k, seed=0), {}
    n = model.input_size
    strokes, what = _demo_strokes(args.char)
    coords, feats = data.render(strokes, n, info.get("scale"),
                                features=info.get("features", "presence"),
                                signature_depth=info.get("signature_depth", 2))
    x = scn.SparseTensor.from_samples([(coords, feats)], (n, n))
    maps = [("input", x)]
    with no_grad():
        h = x
        for layer in model.features:
            h = layer(h)
            if isinstance(layer, (scn.Convolution, scn.MaxPooling)):
                maps.append((f"{type(layer).__name__} {h.spatial_shape[0]}x"
                             f"{h.spatial_shape[1]}", h))
    hist = None
    if args.model:
        from sparsecnn import io
        hist = io.load_file(args.model)[2].get("history") or None
    cols = len(maps) + (1 if hist else 0)
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 2.9))
    for ax, (title, t) in zip(axes, maps):
        img = np.zeros(t.spatial_shape)
        c = np.asarray(t.coords)
        img[c[:, 1], c[:, 2]] = 1
        ax.imshow(img, cmap="gray_r", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"{title}\n{t.n_active} active ({100 * t.density:.1f}%)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if hist:
        ax = axes[-1]
        ep = [r["epoch"] for r in hist]
        ax.plot(ep, [r["train_accuracy"] for r in hist], label="train")
        tested = [r for r in hist if "test_accuracy" in r]
        if tested:
            ax.plot([r["epoch"] for r in tested], [r["test_accuracy"] for r in tested], "o-",
                    label="test")
        ax.set_xlabel("epoch")
        ax.set_title("accuracy", fontsize=8)
        ax.legend(fontsize=7)
    # default fonts lack CJK glyphs: name the character by its code point
    title = "".join(c if ord(c) < 128 else f"U+{ord(c):04X}" for c in what)
    fig.suptitle(f"active sites per layer: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


def _add_data_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", default="kanjivg",
                   help="'kanjivg' (default), 'synthetic', or a stroke file (.npz/.jsonl)")
    s.add_argument("--classes", type=int, default=100, help="number of classes")
    s.add_argument("--select", default="first",
                   help="KanjiVG classes: 'first' (first N kanji), 'kana', or the characters")
    s.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    s.add_argument("--tta", type=int, default=1, help="test-time augmentation passes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")


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
    s = sub.add_parser("train", help="train on stroke data (default: KanjiVG, 100 classes)")
    _add_data_args(s)
    s.add_argument("--arch", choices=["deepcnet", "deepcnin"], default="deepcnet")
    s.add_argument("--l", type=int, default=4, help="depth l (input 3*2**l)")
    s.add_argument("--k", type=int, default=32, help="width k")
    s.add_argument("--activation", default="vleaky", help="relu, leaky, vleaky (1/3)")
    s.add_argument("--dropout", type=float, default=0.0,
                   help="dropout rate p, growing with depth (p * i / l after layer i)")
    s.add_argument("--channel-dropout", action="store_true",
                   help="drop whole channels (one mask per batch) instead of features")
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--repeats", type=int, default=8,
                   help="augmented copies of each training drawing per epoch")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=0.01)
    s.add_argument("--lr-decay", type=float, default=0.05, help="lr0 * exp(-decay * epoch)")
    s.add_argument("--momentum", type=float, default=0.9)
    s.add_argument("--weight-decay", type=float, default=1e-4)
    s.add_argument("--clip-grad", type=float, default=None)
    s.add_argument("--label-smoothing", type=float, default=0.0)
    s.add_argument("--features", default="presence", choices=["presence", "directions",
                                                              "signature"])
    s.add_argument("--signature-depth", type=int, default=2)
    s.add_argument("--scale", type=int, default=None, help="character box in pixels")
    s.add_argument("--eval-every", type=int, default=5, help="evaluate every N epochs")
    s.add_argument("--out", default="sparsecnn-model.npz", help="where to save the model")
    s.add_argument("--checkpoint", default=None, help="checkpoint file (written every epoch)")
    s.add_argument("--resume", action="store_true", help="resume from --checkpoint")
    s.add_argument("--log", default=None, help="JSON-lines metrics log")
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("evaluate", help="accuracy of a saved model")
    _add_data_args(s)
    s.add_argument("model", help="model file from `sparsecnn train`")
    s.set_defaults(func=cmd_evaluate)
    s = sub.add_parser("predict", help="top-5 classes for strokes in a JSON file")
    s.add_argument("model", help="model file from `sparsecnn train`")
    s.add_argument("strokes", help='JSON: [[[x, y], ...], ...] or [{"strokes": ...}, ...]')
    s.add_argument("--top", type=int, default=5)
    s.add_argument("--tta", type=int, default=1)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_predict)
    s = sub.add_parser("show", help="PNG: active sites per layer (+ training curves)")
    s.add_argument("--model", default=None, help="a saved model (else DeepCNet(l, k))")
    s.add_argument("--l", type=int, default=5)
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--char", default=None)
    s.add_argument("--out", default="sparsecnn-show.png")
    s.set_defaults(func=cmd_show)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparsecnn.backend import GPUUnavailableError
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, GPUUnavailableError, FloatingPointError) as e:
        # what a user can act on (missing data or file, no GPU, diverged): one line, no trace
        print(f"sparsecnn {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # output piped into `head` & co.: stop quietly
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
