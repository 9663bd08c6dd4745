"""Training, evaluation and prediction on stroke data: fit / evaluate / predict.

``fit`` trains with SGD (Nesterov momentum, weight decay) and an exponentially decaying
learning rate (Graham's recipe), draws freshly augmented renderings every epoch, shows a
progress bar (loss, accuracy, samples/s) and one summary line per epoch, writes the full
per-epoch records to a JSON-lines metrics log, saves a checkpoint per epoch and resumes from
one exactly (the next step is the step an uninterrupted run would take). Fixed seeds give
identical runs.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import backend, distributed, io, optim, stats
from .autograd import no_grad
from .data import BatchIterator, StrokeDataset
from .functional import cross_entropy, log_softmax
from .metrics import RunningMean, accuracy, topk_accuracy
from .nn import BatchNorm, Dropout, Module

DEFAULT_AUGMENT = {"scale": 0.1, "stretch": 0.1, "shear": 0.15, "rotation": 0.15,
                   "translation": 0.05, "stroke_jitter": 0.01}


@dataclass
class FitConfig:
    """Settings of :func:`fit` (defaults: the recipe that learns KanjiVG reliably)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_decay: float = 0.05          # lr = lr0 * exp(-lr_decay * epoch)
    schedule: str = "exp"           # "exp", "step" (x0.1 every third of the run), "cosine"
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    repeats: int = 1                # augmented copies of every sample per epoch
    augment: dict[str, float] | bool = field(default_factory=lambda: dict(DEFAULT_AUGMENT))
    features: str = "presence"
    signature_depth: int = 2
    scale: int | None = None
    tta: int = 1                    # augmented test passes averaged at evaluation
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 1
    sync_batchnorm: bool = False    # under MPI: batch norm statistics over all ranks' shards

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "repeats", "tta", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.schedule not in ("exp", "step", "cosine"):
            raise ValueError(f"schedule must be 'exp', 'step' or 'cosine', got {self.schedule!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad!r}")
        if not isinstance(self.sync_batchnorm, bool):
            raise ValueError(f"sync_batchnorm must be a bool, got {self.sync_batchnorm!r}")
        backend.parse_device(self.device)


def _augment_kwargs(augment: dict[str, float] | bool) -> dict[str, float] | bool:
    return dict(DEFAULT_AUGMENT) if augment is True else augment


def _scheduler(opt: optim.SGD, cfg: FitConfig) -> optim.LRSchedule:
    if cfg.schedule == "exp":
        return optim.ExponentialLR(opt, cfg.lr_decay)
    if cfg.schedule == "step":
        return optim.StepLR(opt, max(1, cfg.epochs // 3), 0.1)
    return optim.CosineLR(opt, cfg.epochs)


def _dropout_layers(model: Module) -> list[Dropout]:
    return [m for m in model.modules() if isinstance(m, Dropout)]


def _input_size(model: Module) -> int:
    size = getattr(model, "input_size", None)
    if not isinstance(size, int):
        raise TypeError("the model needs an integer input_size (DeepCNet, DeepCNiN)")
    return size


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _few(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def model_labels(data: StrokeDataset, class_names: Sequence[str] | None,
                 num_classes: int | None = None, *, name: str = "data") -> np.ndarray:
    """The labels of ``data`` as indices of a model's classes.

    With ``class_names`` (the model's, in output order) every label is mapped by its
    class *name*: data whose classes come in another order are scored correctly, and a
    ValueError lists the classes of ``data`` (those its samples use) that the model does
    not have. Without names the labels are taken as indices, which must be below
    ``num_classes``.
    """
    labels = np.asarray(data.labels, dtype=np.int64)
    if class_names is not None:
        names = list(class_names)
        if list(data.class_names) != names:
            index = {n: i for i, n in enumerate(names)}
            used = [data.class_names[int(i)] for i in np.unique(labels)]
            unknown = [n for n in used if n not in index]
            if unknown:
                raise ValueError(
                    f"{name} has {len(unknown)} class{'es' if len(unknown) > 1 else ''} that "
                    f"the model does not know: {_few(unknown)}; the model's {len(names)} "
                    f"classes are {_few(names)}")
            mapping = np.array([index.get(n, -1) for n in data.class_names], dtype=np.int64)
            labels = mapping[labels]
    if num_classes is not None and labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{name} has labels up to {int(labels.max())}, but the model has "
                         f"{num_classes} classes")
    return labels


def _model_class_names(model: Module, class_names: Sequence[str] | None) -> list[str] | None:
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    if names is None:
        return None
    if isinstance(names, str | bytes) or not all(isinstance(n, str) for n in names):
        raise TypeError("class_names must be a sequence of str")
    names = list(names)
    nc = getattr(model, "num_classes", None)
    if isinstance(nc, int) and len(names) != nc:
        raise ValueError(f"class_names has {len(names)} names, but the model has {nc} classes")
    return names


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, model: Module, opt: optim.SGD,
                    sched: optim.LRSchedule, epoch: int, history: list[dict],
                    cfg: FitConfig, info: dict[str, Any] | None = None) -> None:
    """Everything an exact resume needs: weights, momentum buffers, schedule, dropout RNGs."""
    ost = opt.state_dict()
    bufs = ost.pop("momentum_buffers")
    extra = {f"momentum.{i}": np.asarray(backend.to_device(b, "cpu"))
             for i, b in enumerate(bufs) if b is not None}
    meta = {
        "kind": "checkpoint",
        "epoch": epoch,
        "history": history,
        "optimizer": ost,
        "scheduler": sched.state_dict(),
        "dropout_rng": [d.rng.bit_generator.state for d in _dropout_layers(model)],
        "config": asdict(cfg),
        "info": info or {},
    }
    io.save(model, path, extra=extra, meta=json.loads(json.dumps(meta, default=_json_default)))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_checkpoint(path: str | os.PathLike, model: Module, opt: optim.SGD,
                    sched: optim.LRSchedule) -> tuple[int, list[dict]]:
    """Restore a checkpoint into model/opt/sched; returns (epochs done, history)."""
    saved, extra, meta = io.load_file(path)
    if meta.get("kind") != "checkpoint":
        raise ValueError(f"{path} is a model file, not a training checkpoint")
    if saved.spec() != model.spec():
        raise ValueError(f"checkpoint {path} holds {saved.spec()['type']} with other settings "
                         f"than the model being trained")
    try:
        epoch, history = int(meta["epoch"]), list(meta.get("history", []))
        if epoch < 0 or not all(isinstance(r, dict) for r in history):
            raise ValueError("bad epoch or history")
        model.load_state_dict(saved.state_dict())
        ost = dict(meta["optimizer"])
        ost["momentum_buffers"] = [extra.get(f"momentum.{i}") for i in range(len(opt.params))]
        opt.load_state_dict(ost)
        sched.load_state_dict(meta["scheduler"])
        for d, st in zip(_dropout_layers(model), meta.get("dropout_rng", [])):
            d.rng.bit_generator.state = st
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ValueError(f"checkpoint {os.fspath(path)!r} is incomplete or corrupt: "
                         f"{type(e).__name__}: {e}") from e
    return epoch, history


# -- evaluation -------------------------------------------------------------------------------
def _logits(model: Module, data: StrokeDataset, *, batch_size: int, tta: int,
            augment: dict | bool, features: str, signature_depth: int, scale: int | None,
            seed: int, device: str, progress: bool = False,
            shard: tuple[int, int] | None = None) -> np.ndarray:
    """Mean over tta passes of the logits of every sample (in dataset order; with ``shard``
    those of the rank's slice of every batch, :func:`_shard_indices`); the model is moved to
    ``device`` first (as fit does)."""
    model.to(backend.require_device(device))
    size = _input_size(model)
    was_training = model.training
    model.eval()
    total = None
    try:
        with no_grad():
            for r in range(tta):
                it = BatchIterator(data, batch_size, size=size, scale=scale, shuffle=False,
                                   seed=seed + 7919 * r, augment=augment,
                                   features=features, signature_depth=signature_depth,
                                   prefetch=2, shard=shard)
                parts = []
                bar = _bar(len(it), f"eval {r + 1}/{tta}", progress)
                for batch in it:
                    if batch is None:   # this rank's slice of a small batch is empty
                        bar.update(1)
                        continue
                    x = batch.to_sparse().to(device)
                    parts.append(backend.to_device(model(x).data, "cpu"))
                    bar.update(1)
                bar.close()
                lg = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
                total = lg.astype(np.float64) if total is None else total + lg
    finally:
        model.train(was_training)
    return (total / tta).astype(np.float32)


def _shard_indices(n: int, batch_size: int, shard: tuple[int, int]) -> np.ndarray:
    """The samples (in order) that rank ``shard[0]`` of ``shard[1]`` evaluates of n samples
    in unshuffled batches of ``batch_size``."""
    r, size = shard
    parts = []
    for i in range(0, n, batch_size):
        lo, hi = distributed.shard_bounds(min(batch_size, n - i), r, size)
        parts.append(np.arange(i + lo, i + hi))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def evaluate(model: Module, data: StrokeDataset, *, batch_size: int = 64, tta: int = 1,
             augment: dict | bool = True, features: str = "presence",
             signature_depth: int = 2, scale: int | None = None, seed: int = 12345,
             device: str = "cpu", progress: bool = False,
             class_names: Sequence[str] | None = None, comm: Any = False) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy of ``model`` on ``data``.

    Every sample is rendered ``tta`` times, augmented with ``augment`` (seeds other than the
    training ones) unless it is False, and the logits are averaged (test-time augmentation).

    ``class_names`` are the model's classes in output order (for a saved model: the
    ``class_names`` of its training data, ``meta["info"]["class_names"]`` in a file written by
    ``sparsecnn train``; default: ``model.class_names`` if the model has them). With them the
    labels of ``data`` are matched by class name (:func:`model_labels`), and data with classes
    the model does not know are refused with a ValueError that lists them; without them the
    labels are taken as output indices.

    ``comm`` (an mpi4py communicator; None: MPI.COMM_WORLD under mpiexec; default False: this
    process alone): every rank evaluates its slice of every batch and the counts are summed,
    so all ranks get the same result (every rank of ``comm`` must call evaluate).
    """
    tta = _positive_int(tta, "tta")
    batch_size = _positive_int(batch_size, "batch_size")
    if len(data) == 0:
        raise ValueError("data is empty")
    nc = getattr(model, "num_classes", None)
    labels = model_labels(data, _model_class_names(model, class_names),
                          nc if isinstance(nc, int) else None)
    comm = distributed.resolve_comm(comm)
    if comm is not None:
        return _evaluate_sharded(model, data, labels, comm, batch_size=batch_size, tta=tta,
                                 augment=_augment_kwargs(augment), features=features,
                                 signature_depth=signature_depth, scale=scale, seed=seed,
                                 device=device, progress=progress)
    lg = _logits(model, data, batch_size=batch_size, tta=tta, augment=_augment_kwargs(augment),
                 features=features, signature_depth=signature_depth, scale=scale, seed=seed,
                 device=device, progress=progress)
    if labels.size and int(labels.max()) >= lg.shape[1]:
        raise ValueError(f"data has labels up to {int(labels.max())}, but the model gives "
                         f"{lg.shape[1]} outputs")
    lsm = log_softmax(lg.astype(np.float64))
    acc = topk_accuracy(lg, labels, ks=(1, 5))
    return {"loss": float(-lsm[np.arange(len(labels)), labels].mean()),
            "accuracy": acc[1], "top5": acc[5], "n": int(len(labels))}


def _evaluate_sharded(model: Module, data: StrokeDataset, labels: np.ndarray, comm: Any, *,
                      progress: bool, **kw: Any) -> dict[str, float]:
    red = distributed.GradientReducer(comm)
    shard = (red.rank, red.size)
    lg = _logits(model, data, shard=shard, progress=progress and red.rank == 0, **kw)
    mine = labels[_shard_indices(len(data), kw["batch_size"], shard)]
    nll = top1 = top5 = 0.0
    if len(mine):
        if int(mine.max()) >= lg.shape[1]:
            raise ValueError(f"data has labels up to {int(mine.max())}, but the model gives "
                             f"{lg.shape[1]} outputs")
        lsm = log_softmax(lg.astype(np.float64))
        acc = topk_accuracy(lg, mine, ks=(1, 5))
        nll = float(-lsm[np.arange(len(mine)), mine].sum())
        top1, top5 = round(acc[1] * len(mine)), round(acc[5] * len(mine))
    tot = red.sum_float64([nll, top1, top5, len(mine)])
    n = int(round(tot[3]))
    return {"loss": float(tot[0] / n), "accuracy": float(tot[1] / n),
            "top5": float(tot[2] / n), "n": n}


def predict(model: Module, samples: Sequence[Any], *, tta: int = 1,
            augment: dict | bool = True, features: str = "presence", signature_depth: int = 2,
            scale: int | None = None, seed: int = 12345, batch_size: int = 64,
            device: str = "cpu") -> np.ndarray:
    """Class probabilities (n, num_classes) for a list of stroke samples (n may be 0)."""
    tta = _positive_int(tta, "tta")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(samples, str | bytes | np.ndarray) or not isinstance(samples, Sequence):
        raise TypeError(f"samples must be a list of stroke samples, got {type(samples).__name__}")
    if len(samples) == 0:
        nc = getattr(model, "num_classes", None)
        if not isinstance(nc, int):   # ask the model: one blank sample gives (1, classes)
            nc = predict(model, [[]], tta=1, augment=False, features=features,
                         signature_depth=signature_depth, scale=scale,
                         device=device).shape[1]
        return np.zeros((0, nc), np.float32)
    ds = StrokeDataset(list(samples), np.zeros(len(samples), np.int64), ["0"])
    lg = _logits(model, ds, batch_size=batch_size, tta=tta, augment=_augment_kwargs(augment),
                 features=features, signature_depth=signature_depth, scale=scale, seed=seed,
                 device=device)
    p = np.exp(log_softmax(lg.astype(np.float64)))
    return p.astype(np.float32)


# -- training ---------------------------------------------------------------------------------
def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _bar_write(line: str) -> None:
    """Print a line to stdout without breaking a progress bar that is being drawn."""
    from tqdm.auto import tqdm
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def epoch_summary(rec: dict[str, Any], epochs: int, extra_names: Sequence[str] = ()) -> str:
    """The line ``fit`` shows after every epoch (the full record goes to the ``log`` file)."""
    width = len(str(epochs))
    parts = [f"epoch {rec['epoch']:>{width}}/{epochs}", f"loss {rec['train_loss']:.4f}",
             f"accuracy {100 * rec['train_accuracy']:.2f}%"]
    if "test_accuracy" in rec:
        parts.append(f"held-out {100 * rec['test_accuracy']:.2f}% "
                     f"(top-5 {100 * rec['test_top5']:.2f}%)")
    for name in extra_names:
        if f"{name}_accuracy" in rec:
            parts.append(f"{name} {100 * rec[f'{name}_accuracy']:.2f}%")
    parts.append(f"{rec['samples_per_second']:.0f} samples/s")
    parts.append(f"lr {rec['lr']:.3g}")
    return "  ".join(parts)


def _check_fit_data(model: Module, train_data: Any, test_data: Any,
                    extra_eval: dict[str, Any] | None) -> None:
    """Refuse data that cannot train ``model`` before any work is done."""
    for name, ds in (("train_data", train_data), ("test_data", test_data),
                     *((f"extra_eval[{k!r}]", v) for k, v in (extra_eval or {}).items())):
        if ds is not None and not isinstance(ds, StrokeDataset):
            raise TypeError(f"{name} must be a StrokeDataset, got {type(ds).__name__}")
    if len(train_data) == 0:
        raise ValueError("train_data is empty: fit needs at least one training sample")
    if test_data is not None and len(test_data) == 0:
        raise ValueError("test_data is empty: pass test_data=None to train without "
                         "held-out evaluation")
    nc = getattr(model, "num_classes", None)
    nc = nc if isinstance(nc, int) else None
    model_labels(train_data, None, nc, name="train_data")
    held_out = {"test_data": test_data, **{f"extra_eval[{k!r}]": v
                                           for k, v in (extra_eval or {}).items()}}
    for name, ds in held_out.items():
        if ds is not None and len(ds):
            model_labels(ds, train_data.class_names, nc, name=name)


def fit(model: Module, train_data: StrokeDataset, test_data: StrokeDataset | None = None, *,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        log: str | os.PathLike | None = None, progress: bool = True,
        extra_eval: dict[str, StrokeDataset] | None = None, info: dict | None = None,
        comm: Any = None, **settings: Any) -> list[dict[str, Any]]:
    """Train ``model`` on ``train_data``; returns the per-epoch history.

    Parameters
    ----------
    model : DeepCNet, DeepCNiN or any Module with ``input_size`` that maps a SparseTensor
        batch to logits (B, num_classes)
    train_data, test_data : StrokeDataset (unit-box strokes)
    checkpoint : path of the checkpoint written after every epoch (.npz)
    resume : continue from ``checkpoint`` if it exists (exactly: same next step)
    log : path of a JSON-lines file, one object per epoch
    extra_eval : more held-out sets evaluated every epoch, by name (e.g. variant drawings)
    comm : an mpi4py communicator to train data-parallel on (default None: ``MPI.COMM_WORLD``
        when the process was started by mpiexec with more than one process and mpi4py can be
        imported; False: this process alone). Every rank renders its fixed slice of each
        global batch (``batch_size`` stays the global batch), the gradients are summed in one
        allreduce per step (:mod:`sparsecnn.distributed`) and every rank applies the same
        update, so the model is that of one process with the same settings (to float
        rounding). Evaluation is sharded too; rank 0 alone prints and writes ``log`` and
        ``checkpoint``; every rank returns the same history. Batch norm uses each rank's own
        batch statistics (``sync_batchnorm=True``: those of the whole global batch, summed
        over the ranks in the forward and backward, as one process computes them; every
        rank then needs at least one sample per step); its running statistics are averaged
        over the ranks at the end of every epoch. Dropout masks differ per rank (rank r > 0
        reseeds from rank 0's generator and r), reproducibly. On more than one rank an
        uncaught exception aborts the whole job (:func:`distributed.install_abort_hook`).
    **settings : fields of :class:`FitConfig` (epochs, batch_size, lr, momentum, ...)
    """
    cfg = FitConfig(**settings)
    cfg.validate()
    _check_fit_data(model, train_data, test_data, extra_eval)
    comm = distributed.resolve_comm(comm)
    red = distributed.GradientReducer(comm) if comm is not None else None
    distributed.install_abort_hook(comm)   # an uncaught error on one rank ends the job
    rank = red.rank if red is not None else 0
    lead = rank == 0
    progress = progress and lead
    fault = _fault_step(rank)
    device = backend.require_device(cfg.device)
    if red is not None and device == "cuda":
        distributed.use_local_device(comm)   # rank r: GPU local_rank % device_count
    model.to(device)
    size = _input_size(model)
    aug = _augment_kwargs(cfg.augment)
    reps = train_data if cfg.repeats == 1 else train_data.subset(
        np.repeat(np.arange(len(train_data)), cfg.repeats))
    it = BatchIterator(reps, cfg.batch_size, size=size, scale=cfg.scale, shuffle=True,
                       seed=cfg.seed, augment=aug, features=cfg.features,
                       signature_depth=cfg.signature_depth, drop_last=len(reps) >= cfg.batch_size,
                       prefetch=3, shard=(rank, red.size) if red is not None else None)
    opt = optim.SGD(model.parameters(), cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                    weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg)
    start, history = 0, []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start, history = load_checkpoint(checkpoint, model, opt, sched)
    bn_sync = None
    if red is not None and cfg.sync_batchnorm:
        smallest = min(cfg.batch_size, len(reps))
        if smallest < red.size:
            raise ValueError(f"sync_batchnorm needs at least one sample per rank and step: "
                             f"batch of {smallest} on {red.size} ranks")
        bn_sync = distributed.BatchNormSync(comm)
        red.bn_sync = bn_sync
    if red is not None and rank > 0:   # masks of its own, reproducibly
        for d in _dropout_layers(model):
            d.rng = np.random.default_rng([int(d.rng.integers(2**62)), rank])
    # per-sample cost, as SparseConvNet reports it (of the whole first batch, on every rank)
    shard, it.shard = it.shard, None
    try:
        epoch_iter = it.batches(0)
        first = next(epoch_iter)
        getattr(epoch_iter, "close", lambda: None)()
    finally:
        it.shard = shard
    rows = stats.layer_stats(model, first.to_sparse().to(device))
    sp, de = stats.total_macs(rows)
    bs = first.batch_size
    cost = {"macs_per_sample": sp / bs, "dense_macs_per_sample": de / bs,
            "active_sites_per_sample": [r.active_sites / bs for r in rows]}
    names = train_data.class_names   # the model's classes: held-out labels go by name
    logf = open(log, "a") if log is not None and lead else None
    evcomm = comm if comm is not None else False
    gstep = 0
    bns = [m for m in model.modules() if isinstance(m, BatchNorm)] if bn_sync else []
    for m in bns:
        m.sync = bn_sync
    try:
        for epoch in range(start, cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            loss_m, acc_m = RunningMean(), RunningMean()
            bar = _bar(len(it), f"epoch {epoch + 1}/{cfg.epochs}", progress)
            for step, batch in enumerate(it.batches(epoch)):
                gstep += 1
                if fault is not None and gstep == fault[0]:
                    if fault[1]:       # the process dies (as if killed), no Python cleanup
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError(f"injected fault on rank {rank} at step {gstep} "
                                       f"(SPARSECNN_FAULT_INJECT)")
                if red is not None:
                    lv, b, acc = _parallel_step(model, batch, red, opt, cfg, device, epoch,
                                                step)
                    loss_m.update(lv, b)
                    acc_m.update(acc, b)
                    dt = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss_m.mean:.3f}", acc=f"{acc_m.mean:.3f}",
                                    sps=f"{loss_m.count / dt:.0f}")
                    bar.update(1)
                    continue
                x = batch.to_sparse().to(device)
                with np.errstate(over="ignore", invalid="ignore"):  # reported just below
                    logits = model(x)
                    loss = cross_entropy(logits, batch.labels,
                                         label_smoothing=cfg.label_smoothing)
                lv = loss.item()
                if not math.isfinite(lv):
                    raise FloatingPointError(
                        f"the loss became {lv} at epoch {epoch + 1}, step {step + 1} (lr "
                        f"{opt.lr:.3g}): training diverged; lower the learning rate (lr=...) "
                        f"or clip gradients (clip_grad=...)")
                with np.errstate(over="ignore", invalid="ignore"):
                    loss.backward()
                if cfg.clip_grad is not None:
                    optim.clip_grad_norm(model.parameters(), cfg.clip_grad)
                opt.step()
                opt.zero_grad()
                b = batch.batch_size
                loss_m.update(lv, b)
                acc_m.update(accuracy(logits.data, batch.labels), b)
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_m.mean:.3f}", acc=f"{acc_m.mean:.3f}",
                                sps=f"{loss_m.count / dt:.0f}")
                bar.update(1)
            bar.close()
            sched.step()
            if red is not None:
                _average_buffers(model, red)
            dt = time.perf_counter() - t0
            rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_m.mean,
                                   "train_accuracy": acc_m.mean, "lr": opt.lr,
                                   "seconds": dt, "samples_per_second": loss_m.count / dt}
            last = epoch + 1 == cfg.epochs
            if test_data is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
                ev = evaluate(model, test_data, batch_size=cfg.batch_size,
                              tta=cfg.tta, augment=aug, features=cfg.features,
                              signature_depth=cfg.signature_depth, scale=cfg.scale,
                              device=device, class_names=names, comm=evcomm)
                rec.update({f"test_{k}": v for k, v in ev.items() if k != "n"})
            for name, ds in (extra_eval or {}).items():
                if len(ds) and ((epoch + 1) % cfg.eval_every == 0 or last):
                    # other drawings of the classes: as drawn, augmented only for tta > 1
                    ev = evaluate(model, ds, batch_size=cfg.batch_size, tta=cfg.tta,
                                  augment=aug if cfg.tta > 1 else False,
                                  features=cfg.features,
                                  signature_depth=cfg.signature_depth, scale=cfg.scale,
                                  device=device, class_names=names, comm=evcomm)
                    rec.update({f"{name}_{k}": v for k, v in ev.items() if k != "n"})
            if epoch == 0 or start == epoch:
                rec.update(cost)
            history.append(rec)
            if progress:
                _bar_write(epoch_summary(rec, cfg.epochs, list(extra_eval or ())))
            if logf is not None:
                logf.write(json.dumps(rec, default=_json_default) + "\n")
                logf.flush()
            if checkpoint is not None and lead:
                save_checkpoint(checkpoint, model, opt, sched, epoch + 1, history, cfg, info)
    finally:
        for m in bns:
            m.__dict__.pop("sync", None)
        if logf is not None:
            logf.close()
    return history


def _fault_step(rank: int) -> tuple[int, bool] | None:
    """(step, kill): the step (counted from 1 over the whole run) at which this rank raises,
    or with ``:kill`` is killed, from ``SPARSECNN_FAULT_INJECT=RANK:STEP[:kill]`` (a test
    hook for the fault handling of MPI runs)."""
    spec = os.environ.get("SPARSECNN_FAULT_INJECT", "").strip()
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "kill"):
            raise ValueError
        r, k = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"SPARSECNN_FAULT_INJECT must be RANK:STEP or RANK:STEP:kill, got "
                         f"{spec!r}") from None
    return (k, len(parts) == 3) if r == rank else None


def _parallel_step(model: Module, batch: Any, red: distributed.GradientReducer,
                   opt: optim.SGD, cfg: FitConfig, device: str, epoch: int,
                   step: int) -> tuple[float, int, float]:
    """One data-parallel step on this rank's slice (``batch``, None if empty) of the global
    batch; returns the global batch's mean loss, size and accuracy."""
    if batch is None:
        loss = logits = None
        lv, b, correct = 0.0, 0, 0.0
    else:
        x = batch.to_sparse().to(device)
        with np.errstate(over="ignore", invalid="ignore"):
            logits = model(x)
            loss = cross_entropy(logits, batch.labels, label_smoothing=cfg.label_smoothing)
        lv, b = loss.item(), batch.batch_size
        correct = float(round(accuracy(logits.data, batch.labels) * b))
    tot = red.sum_float64([lv * b, correct, b])
    gb = int(round(tot[2]))
    glv = float(tot[0] / gb)
    if not math.isfinite(glv):   # every rank sees the same sum: all raise together
        raise FloatingPointError(
            f"the loss became {glv} at epoch {epoch + 1}, step {step + 1} (lr "
            f"{opt.lr:.3g}): training diverged; lower the learning rate (lr=...) "
            f"or clip gradients (clip_grad=...)")
    bn_sync = getattr(red, "bn_sync", None)
    if bn_sync is not None:
        bn_sync.weight = b / gb   # batch norm's backward: in units of this rank's loss
    if loss is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            loss.backward()
    red.reduce(model.parameters(), b / gb)   # sum of (b / B) * local mean = global mean
    if cfg.clip_grad is not None:
        optim.clip_grad_norm(model.parameters(), cfg.clip_grad)
    opt.step()
    opt.zero_grad()
    return glv, gb, float(tot[1] / gb)


def _average_buffers(model: Module, red: distributed.GradientReducer) -> None:
    """Average the modules' buffers (batch norm running statistics) over the ranks."""
    owners = [(m, name) for m in model.modules() for name in m._buffers()]
    if not owners:
        return
    means = red.average_buffers([m._buffers()[name] for m, name in owners])
    for (m, name), v in zip(owners, means):
        setattr(m, name, v)
