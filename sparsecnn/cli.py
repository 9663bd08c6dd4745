"""Command line: ``sparsecnn <command>`` / ``python -m sparsecnn <command>``.

Commands: info, demo, train, evaluate, predict, show. Argument parsing only; the work is in
sparsecnn.train, sparsecnn.stats and sparsecnn.data.

A user's mistake (a bad option, a missing or malformed file, a model file whose saved settings
do not fit its network, too little data) is reported as one line on stderr,
``sparsecnn <command>: error: ...``, with exit status 2; ``--debug`` or ``SPARSECNN_DEBUG=1``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class UsageError(Exception):
    """A user's mistake that the command line reports in one line (no traceback)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


# errors that a user's input causes: one line, no traceback (see main)
USER_ERRORS = (UsageError, ValueError, TypeError, OSError, MemoryError, FloatingPointError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option raises UsageError (main prints one line) instead of printing
    the usage block and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (`{self.prog} --help` lists the options)", self.prog)


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum or (maximum is not None and v > maximum):
            want = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {want}, got {v}")
        return v
    parse.__name__ = "int"
    return parse


def _real(lo: float, hi: float = math.inf, *, lo_open: bool = False,
          hi_open: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (
            v < hi if hi_open else v <= hi)
        if not ok:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo:g}, {hi:g}{right}, got {text}")
        return v
    parse.__name__ = "float"
    return parse


def _activation(text: str) -> str | float:
    from sparsecnn.models import ACTIVATIONS
    if text in ACTIVATIONS:
        return text
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(sorted(ACTIVATIONS))} or a slope in [0, 1), got {text!r}")
    return v


_positive = _int_at_least(1)


def cmd_info(args: argparse.Namespace) -> int:
    """Version, OpenMP threads, BLAS, GPU."""
    import scipy

    import sparsecnn
    from sparsecnn import _cpu, backend, distributed

    comm = distributed.default_comm()
    ranks = comm.gather(_rank_line(comm), root=0) if comm is not None else None
    if comm is not None and comm.Get_rank() != 0:
        return 0   # rank 0 prints for every rank
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
    if ranks is not None:
        print(f"MPI        {distributed.library_version()}; mpi4py {_mpi4py_version()}; "
              f"{comm.Get_size()} ranks (this is rank 0):")
        for line in ranks:
            print(f"           {line}")
    elif distributed.mpi_available():
        try:
            from mpi4py import MPI
            world = MPI.COMM_WORLD
            print(f"MPI        {distributed.library_version()}; mpi4py {_mpi4py_version()}; "
                  f"{world.Get_size()} rank{'s' if world.Get_size() > 1 else ''} "
                  f"(this is rank {world.Get_rank()})")
        except Exception as e:   # a broken MPI install: say so, do not fail
            print(f"MPI        mpi4py found but unusable: {_message(e)}")
    else:
        print("MPI        not available: mpi4py is not installed (pip install 'sparsecnn[mpi]')")
    ok, why = backend.gpu_status()
    print(f"GPU        {'available: ' + why if ok else 'not available: ' + why}")
    if ok:
        from sparsecnn import _gpu
        print(f"device     cuda = {_gpu.device_name()}; kernels {', '.join(_gpu.KERNEL_NAMES)}"
              f"; fused {', '.join(sorted(_gpu.CAPABILITIES))}")
    return 0


def _rank_line(comm: Any) -> str:
    """One MPI rank's line of ``sparsecnn info``: its host, local rank and device."""
    from sparsecnn import backend, distributed
    lr = distributed.local_rank(comm)
    ok, why = backend.gpu_status()
    if ok:
        from sparsecnn import _gpu
        dev = distributed.use_local_device(comm)
        where = f"cuda{'' if dev is None else ':' + str(dev)} = {_gpu.device_name()}"
    else:
        where = "cpu"
    return (f"rank {comm.Get_rank()}: host {platform.node()}, local rank {lr}, "
            f"device {where}")


def _demo_strokes(char: str | None):
    """A character to draw: KanjiVG if installed, else a seeded synthetic sample."""
    from sparsecnn import data
    try:
        ds = data.load_kanjivg(select=[char or "永"], classes=1)
        return ds.samples[0], f"KanjiVG {ds.class_names[0]!r}"
    except (FileNotFoundError, ValueError, KeyError) as e:
        if char:
            raise UsageError(f"cannot load {char!r} from KanjiVG: {e}") from None
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
# the 80/20 split of a user's file is made per class: round(0.8 * 3) = 2 of 3 drawings train,
# one is held out; a class of 1 or 2 drawings is held out nowhere
_MIN_PER_CLASS = 3


def _split_user_data(ds, path: str, seed: int):
    """80/20 split of a user's stroke file, refused if it leaves nothing to train or test."""
    need = (f"training needs at least {_MIN_PER_CLASS} drawings of a class (80% of every "
            f"class trains, 20% is held out for testing)")
    if len(ds) == 0:
        raise ValueError(f"{path} holds no samples; {need}")
    train, test = ds.split(0.8, seed=seed)
    if len(test) == 0:
        most = int(np.bincount(ds.labels).max())
        k = len(np.unique(ds.labels))
        raise ValueError(f"{path} holds too few samples to hold any out ({len(ds)} "
                         f"sample{'s' * (len(ds) > 1)} of {k} class{'es' * (k > 1)}, at most "
                         f"{most} of one class); {need}")
    return train, test


def _load_data(args: argparse.Namespace, class_names: Sequence[str] | None = None):
    """(train, test, extra held-out sets) for --data; ``class_names``: a saved model's classes
    (KanjiVG then loads those characters unless --select is given)."""
    from sparsecnn import data
    if args.data == "kanjivg":
        sel = args.select
        if sel is None:
            sel = list(class_names) if class_names else "first"
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
    train, test = _split_user_data(ds, args.data, args.seed)
    return train, test, {}


def _check_output(path: str | None, flag: str) -> None:
    """Refuse an output path that cannot be written before hours of training."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory, not a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: no such directory {str(parent)!r}")


def _mpi4py_version() -> str:
    import mpi4py
    return getattr(mpi4py, "__version__", "?")


def cmd_train(args: argparse.Namespace) -> int:
    """Train a DeepCNet/DeepCNiN on stroke data; print held-out accuracy; save the model."""
    import sparsecnn as scn
    from sparsecnn import train as T

    if args.resume and args.checkpoint is None:
        raise UsageError("--resume needs --checkpoint FILE")
    for path, flag in ((args.out, "--out"), (args.checkpoint, "--checkpoint"),
                       (args.log, "--log")):
        _check_output(path, flag)
    train, test, extra = _load_data(args)
    arch = {"deepcnet": scn.models.DeepCNet, "deepcnin": scn.models.DeepCNiN}[args.arch]
    from sparsecnn.data import num_feature_channels
    cin = num_feature_channels(args.features, args.signature_depth)
    model = arch(args.l, args.k, in_channels=cin, num_classes=train.num_classes,
                 activation=args.activation, dropout=args.dropout,
                 channel_dropout=args.channel_dropout, seed=args.seed)
    n_extra = sum(len(v) for v in extra.values())
    from sparsecnn import distributed
    comm = distributed.resolve_comm(None)
    lead = comm is None or comm.Get_rank() == 0
    say = print if lead else (lambda *a, **k: None)
    say(f"{type(model).__name__}(l={args.l}, k={args.k}), input {model.input_size}x"
          f"{model.input_size}, {sum(p.data.size for p in model.parameters()):,} parameters; "
          f"{train.num_classes} classes, {len(train)} training drawings x {args.repeats} "
          f"augmented copies per epoch, {len(test)} test drawings"
          + (f", {n_extra} variant drawings" if n_extra else "")
          + (f"; data-parallel on {comm.Get_size()} MPI ranks" if comm is not None else ""),
          flush=True)
    info = {"class_names": list(train.class_names), "features": args.features,
            "signature_depth": args.signature_depth, "scale": args.scale}
    t0 = time.perf_counter()
    hist = T.fit(model, train, test, extra_eval=extra, checkpoint=args.checkpoint,
                 resume=args.resume, log=args.log, progress=not args.quiet, info=info,
                 comm=comm if comm is not None else False,
                 epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 lr_decay=args.lr_decay, weight_decay=args.weight_decay,
                 momentum=args.momentum, repeats=args.repeats, features=args.features,
                 signature_depth=args.signature_depth, scale=args.scale, tta=args.tta,
                 seed=args.seed, device=args.device, clip_grad=args.clip_grad,
                 eval_every=args.eval_every, label_smoothing=args.label_smoothing,
                 sync_batchnorm=args.sync_batchnorm)
    minutes = (time.perf_counter() - t0) / 60
    last = hist[-1]
    if not lead:
        return 0
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


def _load_model(path: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model, checked settings, meta) of a model file from ``sparsecnn train``.

    The settings saved beside the network (features, signature depth, scale, class names) are
    checked against it here, so that a file whose metadata does not fit its network is
    refused in one line instead of failing inside the first forward pass.
    """
    from sparsecnn import io
    from sparsecnn.data import FEATURE_KINDS, num_feature_channels
    model, _, meta = io.load_file(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: the saved metadata does not fit the model: {why}")

    sizes = [getattr(model, a, None) for a in ("input_size", "num_classes", "in_channels")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes) or getattr(
            model, "dim", 2) != 2:
        raise ValueError(f"{path} holds a {type(model).__name__}, not the 2-D DeepCNet or "
                         f"DeepCNiN that sparsecnn's commands run")
    size, num_classes, in_channels = sizes
    if not isinstance(meta, dict) or not isinstance(meta.get("info", {}), dict):
        raise bad("'info' is not a JSON object")
    info = meta.get("info", {})
    features = info.get("features", "presence")
    if features not in FEATURE_KINDS:
        raise bad(f"features={features!r}, expected one of {', '.join(FEATURE_KINDS)}")
    depth = info.get("signature_depth", 2)
    if isinstance(depth, bool) or depth not in (1, 2, 3):
        raise bad(f"signature_depth={depth!r}, expected 1, 2 or 3")
    scale = info.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int)
                              or not 1 <= scale <= size):
        raise bad(f"scale={scale!r}, expected an int in [1, {size}] (the input size) or null")
    channels = num_feature_channels(features, depth)
    if channels != in_channels:
        raise bad(f"features={features!r} (signature_depth={depth}) give {channels} input "
                  f"channels, the network takes {in_channels}")
    names = info.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad("class_names is not a list of strings")
        if len(names) != num_classes or len(set(names)) != len(names):
            raise bad(f"{len(names)} class_names ({len(set(names))} distinct) for a network "
                      f"with {num_classes} classes")
    settings = {"features": features, "signature_depth": depth, "scale": scale,
                "class_names": names}
    return model, settings, meta


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Accuracy of a saved model on held-out data (labels matched by class name)."""
    from sparsecnn import train as T
    model, info, _ = _load_model(args.model)
    args.classes = model.num_classes
    _, test, extra = _load_data(args, info["class_names"])
    kw = dict(tta=args.tta, features=info["features"], signature_depth=info["signature_depth"],
              scale=info["scale"], device=args.device, progress=not args.quiet,
              class_names=info["class_names"])
    sets = {name: ds for name, ds in {"test": test, **extra}.items() if len(ds)}
    for ds in sets.values():   # refuse data of other classes before any work
        T.model_labels(ds, info["class_names"], model.num_classes, name=f"--data {args.data}")
    for name, ds in sets.items():
        aug = name == "test" or args.tta > 1   # variants: as drawn unless tta
        r = T.evaluate(model, ds, augment=aug, **kw)
        print(f"{name:<9} n={r['n']:<6} accuracy {100 * r['accuracy']:.2f}%  top-5 "
              f"{100 * r['top5']:.2f}%  loss {r['loss']:.4f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes with probabilities for strokes in a JSON file."""
    from sparsecnn import train as T
    from sparsecnn.data import load_samples, normalize
    model, info, _ = _load_model(args.model)
    # the same checks as training data: nothing is reshaped, strings are not numbers
    strokes = [normalize(s) for s in load_samples(args.strokes)]
    probs = T.predict(model, strokes, tta=args.tta, features=info["features"],
                      signature_depth=info["signature_depth"], scale=info["scale"],
                      device=args.device)
    names = info["class_names"] or [str(i) for i in range(probs.shape[1])]
    out = []
    for p in probs:
        top = np.argsort(-p, kind="stable")[:args.top]
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
        raise UsageError("sparsecnn show needs matplotlib: pip install sparsecnn[plot]") from None
    import sparsecnn as scn
    from sparsecnn import data
    from sparsecnn.autograd import no_grad

    meta: dict[str, Any] = {}
    if args.model:
        model, info, meta = _load_model(args.model)
    else:
        model = scn.models.DeepCNet(args.l, args.k, seed=0)
        info = {"scale": None, "features": "presence", "signature_depth": 2}
    n = model.input_size
    strokes, what = _demo_strokes(args.char)
    coords, feats = data.render(strokes, n, info["scale"], features=info["features"],
                                signature_depth=info["signature_depth"])
    x = scn.SparseTensor.from_samples([(coords, feats)], (n, n))
    maps = [("input", x)]
    with no_grad():
        h = x
        for layer in model.features:
            h = layer(h)
            if isinstance(layer, (scn.Convolution, scn.MaxPooling)):
                maps.append((f"{type(layer).__name__} {h.spatial_shape[0]}x"
                             f"{h.spatial_shape[1]}", h))
    hist = meta.get("history") or None
    if hist is not None and not (isinstance(hist, list) and all(
            isinstance(r, dict) and isinstance(r.get("epoch"), int | float)
            and isinstance(r.get("train_accuracy"), int | float) for r in hist)):
        raise ValueError(f"{args.model}: the saved training history is malformed")
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
    s.add_argument("--classes", type=_positive, default=100, help="number of classes")
    s.add_argument("--select", default=None,
                   help="KanjiVG classes: 'first' (first N kanji, default for train), 'kana', "
                        "or the characters (evaluate: the model's classes)")
    s.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    s.add_argument("--tta", type=_positive, default=1,
                   help="test-time augmentation passes (>= 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def build_parser() -> argparse.ArgumentParser:
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (or set SPARSECNN_DEBUG=1)")
    p = _Parser(prog="sparsecnn", description="Spatially-sparse CNNs.",
                epilog="Errors are reported in one line; --debug or SPARSECNN_DEBUG=1 shows "
                       "the traceback.")
    p.add_argument("--debug", action="store_true", default=False,
                   help="show the traceback of an error (or set SPARSECNN_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[debug], **kw)

    s = cmd("info", help="version, threads, BLAS, GPU")
    s.set_defaults(func=cmd_info)
    s = cmd("demo", help="per-layer active sites and multiply-adds of a DeepCNet")
    s.add_argument("--l", type=_positive, default=5, help="DeepCNet depth l (input 3*2**l)")
    s.add_argument("--k", type=_positive, default=32, help="DeepCNet width k")
    s.add_argument("--char", default=None, help="KanjiVG character to draw")
    s.set_defaults(func=cmd_demo)
    s = cmd("train", help="train on stroke data (default: KanjiVG, 100 classes)")
    _add_data_args(s)
    s.add_argument("--arch", choices=["deepcnet", "deepcnin"], default="deepcnet")
    s.add_argument("--l", type=_positive, default=4, help="depth l (input 3*2**l)")
    s.add_argument("--k", type=_positive, default=32, help="width k")
    s.add_argument("--activation", type=_activation, default="vleaky",
                   help="relu, leaky, vleaky (1/3) or a slope in [0, 1)")
    s.add_argument("--dropout", type=_real(0, 1), default=0.0,
                   help="dropout rate p, growing with depth (p * i / l after layer i)")
    s.add_argument("--channel-dropout", action="store_true",
                   help="drop whole channels (one mask per batch) instead of features")
    s.add_argument("--epochs", type=_positive, default=20)
    s.add_argument("--repeats", type=_positive, default=8,
                   help="augmented copies of each training drawing per epoch")
    s.add_argument("--batch-size", type=_positive, default=64)
    s.add_argument("--lr", type=_real(0, lo_open=True), default=0.01)
    s.add_argument("--lr-decay", type=_real(0), default=0.05, help="lr0 * exp(-decay * epoch)")
    s.add_argument("--momentum", type=_real(0, 1), default=0.9)
    s.add_argument("--weight-decay", type=_real(0), default=1e-4)
    s.add_argument("--clip-grad", type=_real(0, lo_open=True), default=None)
    s.add_argument("--label-smoothing", type=_real(0, 1), default=0.0)
    s.add_argument("--sync-batchnorm", action="store_true",
                   help="under mpiexec: batch norm statistics of the global batch (all ranks)")
    s.add_argument("--features", default="presence", choices=["presence", "directions",
                                                              "signature"])
    s.add_argument("--signature-depth", type=int, choices=[1, 2, 3], default=2)
    s.add_argument("--scale", type=_positive, default=None, help="character box in pixels")
    s.add_argument("--eval-every", type=_positive, default=5, help="evaluate every N epochs")
    s.add_argument("--out", default="sparsecnn-model.npz", help="where to save the model")
    s.add_argument("--checkpoint", default=None, help="checkpoint file (written every epoch)")
    s.add_argument("--resume", action="store_true", help="resume from --checkpoint")
    s.add_argument("--log", default=None, help="JSON-lines metrics log (one record per epoch)")
    s.set_defaults(func=cmd_train)
    s = cmd("evaluate", help="accuracy of a saved model")
    _add_data_args(s)
    s.add_argument("model", help="model file from `sparsecnn train`")
    s.set_defaults(func=cmd_evaluate)
    s = cmd("predict", help="top-5 classes for strokes in a JSON file")
    s.add_argument("model", help="model file from `sparsecnn train`")
    s.add_argument("strokes", help='JSON: [[[x, y], ...], ...], {"strokes": ...} or '
                                   '[{"strokes": ...}, ...]; or a .jsonl stroke file')
    s.add_argument("--top", type=_positive, default=5, help="classes shown per sample (>= 1)")
    s.add_argument("--tta", type=_positive, default=1,
                   help="test-time augmentation passes (>= 1)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_predict)
    s = cmd("show", help="PNG: active sites per layer (+ training curves)")
    s.add_argument("--model", default=None, help="a saved model (else DeepCNet(l, k))")
    s.add_argument("--l", type=_positive, default=5)
    s.add_argument("--k", type=_positive, default=32)
    s.add_argument("--char", default=None)
    s.add_argument("--out", default="sparsecnn-show.png")
    s.set_defaults(func=cmd_show)
    return p


def _debug_requested(argv: Sequence[str] | None) -> bool:
    if os.environ.get("SPARSECNN_DEBUG", "").strip() not in ("", "0"):
        return True
    return "--debug" in (sys.argv[1:] if argv is None else list(argv))


def _message(e: BaseException) -> str:
    """One line for an error: the message without its traceback (or its own newlines)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.strerror}: {os.fsdecode(e.filename)}"
    elif isinstance(e, MemoryError):
        text = f"out of memory{': ' + str(e) if str(e) else ''}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 a user's error, 130 interrupted)."""
    debug = _debug_requested(argv)
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:   # blamed on the command they were given to
            prog = f"sparsecnn {args.command}"
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (`{prog} --help` "
                             f"lists the options)", prog)
    except UsageError as e:
        if debug:
            raise
        print(f"{e.prog or 'sparsecnn'}: error: {_message(e)}", file=sys.stderr)
        return 2
    prog = f"sparsecnn {args.command}"
    comm = _mpi_world()
    if comm is not None:
        return _main_mpi(args, prog, comm, debug)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:   # output piped into `head` & co.: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        # what a user can act on (bad input, missing file, no GPU, diverged): one line
        if debug:
            raise
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
        return 2


def _mpi_world() -> Any | None:
    """MPI.COMM_WORLD when started by mpiexec with more than one process (else None)."""
    from sparsecnn import distributed
    return distributed.default_comm()


def _main_mpi(args: argparse.Namespace, prog: str, comm: Any, debug: bool) -> int:
    """Run a command on one of several MPI ranks: an error on any rank prints its one line
    (with the rank) and aborts the whole job, so no other rank waits for it forever."""
    where = f"rank {comm.Get_rank()} of {comm.Get_size()}"
    try:
        return int(args.func(args) or 0)
    except BaseException as e:   # noqa: BLE001 -- any error must end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        if debug:
            import traceback
            traceback.print_exc()
        kind = "" if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: "
        status = 130 if isinstance(e, KeyboardInterrupt) else (
            2 if isinstance(e, USER_ERRORS) else 1)
        print(f"{prog}: error ({where}): {kind}{_message(e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        import time
        time.sleep(0.2)     # let the launcher forward the line before the abort ends us
        comm.Abort(status)
        return status   # pragma: no cover (Abort does not return)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
