"""Saving and loading models without pickle: one .npz with the arrays and a JSON spec."""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from .nn import LAYERS, Module, Sequential

_SPEC_KEY = "__spec__"
_FORMAT = "sparsecnn-model-1"


def save(model: Module, path: str | os.PathLike, *, extra: dict[str, np.ndarray] | None = None,
         meta: dict[str, Any] | None = None) -> None:
    """Write ``model`` (its spec and state_dict) to ``path`` (.npz).

    ``extra`` arrays (e.g. optimizer state) and a JSON-able ``meta`` dict are stored beside it.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a sparsecnn Module, got {type(model).__name__}")
    doc = {"format": _FORMAT, "model": model.spec(), "meta": meta or {}}
    arrays = {f"param:{k}": v for k, v in model.state_dict().items()}
    for k, v in (extra or {}).items():
        arrays[f"extra:{k}"] = np.asarray(v)
    states = [m.ground_state for m in model.modules()]
    if not all(states):     # the semantics the model was trained with travel with it
        doc["ground_states"] = states
    fusion = [m.fuse for m in model.modules() if isinstance(m, Sequential)]
    if not all(fusion):
        doc["fusion"] = fusion
    arrays[_SPEC_KEY] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save the model to {path!r}: it is a directory")
    tmp = path + ".tmp.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):     # a failed save leaves nothing behind
            os.unlink(tmp)
        raise


def build(spec: Any) -> Module:
    """Construct a module from its spec (only sparsecnn's own layer types are accepted)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"a module spec must be a dict with a 'type', got {spec!r:.80}")
    kind = spec["type"]
    if kind not in LAYERS:
        raise ValueError(f"unknown layer type {kind!r} in model spec")
    args = {k: v for k, v in spec.items() if k != "type"}
    from_spec = getattr(LAYERS[kind], "_from_spec", None)
    if from_spec is not None:       # a container (Residual, Concat) builds its children
        return from_spec(args, build)
    if kind == "Sequential":
        layers = args.get("layers")
        if not isinstance(layers, list):
            raise ValueError("Sequential spec needs a list 'layers'")
        fuse = args.get("fuse", True)
        if not isinstance(fuse, bool) or set(args) - {"layers", "fuse"}:
            raise ValueError(f"bad Sequential spec arguments {sorted(args)}")
        return Sequential(*(build(s) for s in layers), fuse=fuse)
    for k, v in args.items():
        if not isinstance(v, (int, float, str, bool)) or isinstance(v, dict):
            raise ValueError(f"bad argument {k}={v!r:.40} for {kind} in model spec")
    return LAYERS[kind](**args)


_MAX_DEPTH = 64


def _param_count(spec: Any, depth: int = 0) -> int:
    """Upper bound of the array elements that building ``spec`` allocates (checked before
    building, so a hostile spec cannot ask for gigabytes)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"model spec nested deeper than {_MAX_DEPTH} levels")
    if not isinstance(spec, dict):
        raise ValueError("a module spec must be a dict")
    if spec.get("type") == "Sequential":
        layers = spec.get("layers")
        if not isinstance(layers, list):
            raise ValueError("Sequential spec needs a list 'layers'")
        return sum(_param_count(s, depth + 1) for s in layers)
    container = LAYERS.get(spec["type"]) if isinstance(spec.get("type"), str) else None
    if hasattr(container, "_from_spec"):        # a container (Residual, Concat)
        nested = [v for v in spec.values() if isinstance(v, dict)]
        nested += [s for v in spec.values() if isinstance(v, list) for s in v]
        return sum(_param_count(s, depth + 1) for s in nested)

    def num(key: str, default: int = 1) -> int:
        v = spec.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return 0        # not a size: the layer's constructor says what is wrong
        if v > 2**31:
            raise ValueError(f"bad {key}={v!r} in model spec")
        return v
    kind = spec.get("type")
    if kind in ("Convolution", "SubmanifoldConvolution", "Deconvolution",
                "InverseConvolution"):
        return num("filter_size") ** num("dim", 2) * num("in_channels") * num(
            "out_channels") + num("out_channels")
    if kind in ("DepthwiseConvolution", "SubmanifoldDepthwiseConvolution"):
        return (num("filter_size") ** num("dim", 2) + 1) * num("channels")
    if kind == "FMPNet":
        L, k, d = num("n_layers"), num("k"), num("dim", 2)
        if L > 64:
            raise ValueError(f"bad n_layers={L} in model spec")
        total, cin = 0, num("in_channels")
        for i in range(1, L + 2):              # L (C2 - FMP) stages, then a final C2
            cout = k * i
            total += 2 ** d * cin * cout + cout
            cin = cout
        return total + (cin + 1) * num("num_classes")
    if kind == "NetworkInNetwork":
        return (num("in_channels") + 1) * num("out_channels")
    if kind == "Linear":
        return (num("in_features") + 1) * num("out_features")
    if kind == "BatchNorm":
        return 4 * num("channels")
    if kind in ("DeepCNet", "DeepCNiN"):
        l, k, d = num("l"), num("k"), num("dim", 2)
        if l > 30:
            raise ValueError(f"bad l={l} in model spec")
        total, cin = 0, num("in_channels")
        for i in range(l + 1):
            cout = (i + 1) * k
            total += (3 if i == 0 else 2) ** d * cin * cout + cout
            if kind == "DeepCNiN":
                total += (cout + 1) * cout
            cin = cout
        return total + (cin + 1) * num("num_classes")
    return 0


_MAX_SPEC_BYTES = 16 * 2**20
# a model file written by save() stores its arrays uncompressed, so the arrays its headers
# declare fit in the file; this much room is left for compression and zip overhead
_SLACK_FACTOR, _SLACK_BYTES = 2, 2**20


def _npy_headers(zf: zipfile.ZipFile) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every .npy member, from its header alone (no array is read)."""
    out = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise ValueError(f"unexpected member {info.filename!r}")
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version} in {info.filename!r}")
        if dtype.hasobject:
            raise ValueError(f"{info.filename!r} holds Python objects")
        out[info.filename[:-4]] = (tuple(int(n) for n in shape), dtype)
    return out


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = dtype.itemsize
    for k in shape:
        n *= k
    return n


def _check_declared(path: str, headers: dict) -> None:
    """Refuse a file whose arrays declare more bytes than it could hold (a small file that
    would inflate to gigabytes) and parameters that are not float32/float64 arrays."""
    declared = sum(_nbytes(shape, dt) for shape, dt in headers.values())
    size = os.path.getsize(path)
    if declared > _SLACK_FACTOR * size + _SLACK_BYTES:
        raise ValueError(f"its arrays declare {declared} bytes but the file has only {size}")
    for k, (_, dt) in headers.items():
        if k.startswith("param:") and dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"parameter {k[6:]!r} has dtype {dt}; expected float32 or "
                             f"float64")
    if _SPEC_KEY not in headers:
        raise ValueError("no model spec inside")
    shape, dt = headers[_SPEC_KEY]
    if dt != np.uint8 or len(shape) != 1 or shape[0] > _MAX_SPEC_BYTES:
        raise ValueError(f"the model spec must be at most {_MAX_SPEC_BYTES} bytes of uint8, "
                         f"got shape {shape} of {dt}")


def _apply_ground_states(model: Module, states: Any) -> None:
    mods = list(model.modules())
    if (not isinstance(states, list) or len(states) != len(mods)
            or not all(isinstance(v, bool) for v in states)):
        raise ValueError(f"'ground_states' must be a list of {len(mods)} booleans")
    for m, v in zip(mods, states, strict=True):
        m.ground_state = v


def _apply_fusion(model: Module, flags: Any) -> None:
    seqs = [m for m in model.modules() if isinstance(m, Sequential)]
    if (not isinstance(flags, list) or len(flags) != len(seqs)
            or not all(isinstance(v, bool) for v in flags)):
        raise ValueError(f"'fusion' must be a list of {len(seqs)} booleans")
    for m, v in zip(seqs, flags, strict=True):
        m.fuse = v


def load_file(path: str | os.PathLike) -> tuple[Module, dict[str, np.ndarray], dict[str, Any]]:
    """(model, extra arrays, meta) from a file written by :func:`save`.

    Nothing is allocated before the file is checked: the npy headers of every member are
    read first, and a file whose arrays declare more bytes than it holds, whose parameters
    are not float arrays, or whose spec asks for more parameters than it stores is refused
    with a ``ValueError``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            headers = _npy_headers(zf)
            _check_declared(path, headers)
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as z:
                doc = json.loads(bytes(z[_SPEC_KEY].astype(np.uint8)).decode())
                if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                    raise ValueError(f"not a {_FORMAT} file")
                if "model" not in doc:
                    raise ValueError("no 'model' in the spec")
                stored = sum(int(np.prod(shape)) for k, (shape, _) in headers.items()
                             if k.startswith("param:"))
                if _param_count(doc["model"]) > stored + 2**20:   # far more than it holds
                    raise ValueError("the model spec asks for more parameters than the file "
                                     "stores")
                model = build(doc["model"])
                own = model.state_dict()
                for k, (shape, _) in headers.items():
                    if k.startswith("param:") and k[6:] in own and own[k[6:]].shape != shape:
                        raise ValueError(f"state_dict[{k[6:]!r}] has shape {shape}, expected "
                                         f"{own[k[6:]].shape}")
                state = {k[6:]: z[k] for k in z.files if k.startswith("param:")}
                extra = {k[6:]: z[k] for k in z.files if k.startswith("extra:")}
        model.load_state_dict(state)
        if "ground_states" in doc:
            _apply_ground_states(model, doc["ground_states"])
        if "fusion" in doc:
            _apply_fusion(model, doc["fusion"])
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError("'meta' in the spec must be a dict")
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile,
            zipfile.LargeZipFile, UnicodeDecodeError, RecursionError, OverflowError) as e:
        raise ValueError(f"cannot load a sparsecnn model from {path!r}: {e}") from e
    return model, extra, meta


def load(path: str | os.PathLike) -> Module:
    """Read a model written by :func:`save` (no pickle: a hostile file cannot run code)."""
    return load_file(path)[0]
