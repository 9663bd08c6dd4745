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
    arrays[_SPEC_KEY] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    path = os.fspath(path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def build(spec: Any) -> Module:
    """Construct a module from its spec (only sparsecnn's own layer types are accepted)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"a module spec must be a dict with a 'type', got {spec!r:.80}")
    kind = spec["type"]
    if kind not in LAYERS:
        raise ValueError(f"unknown layer type {kind!r} in model spec")
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Sequential":
        layers = args.get("layers")
        if not isinstance(layers, list):
            raise ValueError("Sequential spec needs a list 'layers'")
        return Sequential(*(build(s) for s in layers))
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

    def num(key: str, default: int = 1) -> int:
        v = spec.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return 0        # not a size: the layer's constructor says what is wrong
        if v > 2**31:
            raise ValueError(f"bad {key}={v!r} in model spec")
        return v
    kind = spec.get("type")
    if kind in ("Convolution", "SubmanifoldConvolution"):
        return num("filter_size") ** num("dim", 2) * num("in_channels") * num(
            "out_channels") + num("out_channels")
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


def load_file(path: str | os.PathLike) -> tuple[Module, dict[str, np.ndarray], dict[str, Any]]:
    """(model, extra arrays, meta) from a file written by :func:`save`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            if _SPEC_KEY not in z.files:
                raise ValueError("no model spec inside")
            doc = json.loads(bytes(z[_SPEC_KEY].astype(np.uint8)).decode())
            state = {k[6:]: z[k] for k in z.files if k.startswith("param:")}
            extra = {k[6:]: z[k] for k in z.files if k.startswith("extra:")}
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} file")
        if "model" not in doc:
            raise ValueError("no 'model' in the spec")
        stored = sum(int(np.asarray(v).size) for v in state.values())
        if _param_count(doc["model"]) > stored + 2**20:   # far more than the file holds
            raise ValueError("the model spec asks for more parameters than the file stores")
        model = build(doc["model"])
        model.load_state_dict(state)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile,
            UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"cannot load a sparsecnn model from {path!r}: {e}") from e
    return model, extra, doc.get("meta", {})


def load(path: str | os.PathLike) -> Module:
    """Read a model written by :func:`save` (no pickle: a hostile file cannot run code)."""
    return load_file(path)[0]
