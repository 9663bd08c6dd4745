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


def load_file(path: str | os.PathLike) -> tuple[Module, dict[str, np.ndarray], dict[str, Any]]:
    """(model, extra arrays, meta) from a file written by :func:`save`."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if _SPEC_KEY not in z.files:
                raise ValueError("no model spec inside")
            doc = json.loads(bytes(z[_SPEC_KEY].astype(np.uint8)).decode())
            state = {k[6:]: z[k] for k in z.files if k.startswith("param:")}
            extra = {k[6:]: z[k] for k in z.files if k.startswith("extra:")}
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} file")
        model = build(doc["model"])
        model.load_state_dict(state)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile,
            UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load a sparsecnn model from {path!r}: {e}") from e
    return model, extra, doc.get("meta", {})


def load(path: str | os.PathLike) -> Module:
    """Read a model written by :func:`save` (no pickle: a hostile file cannot run code)."""
    return load_file(path)[0]
