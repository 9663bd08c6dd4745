"""Device arrays of the CUDA backend.

On a GPU they are CuPy arrays and the array module is ``cupy``. Under the CUDA simulation
(``SPARSECNN_CUDA_SIM=1``) they are :class:`SimArray`, a NumPy subclass on host memory that
behaves as a device array does where it matters for correctness:

- it reports device ``"cuda"`` (:func:`sparsecnn.backend.device_of`) and ``.get()`` copies it
  to a plain ``numpy.ndarray``;
- NumPy functions and ufuncs on SimArrays give SimArrays, and mixing a SimArray with a plain
  (host) ndarray is a ``TypeError``, as mixing a CuPy array with a NumPy array is;
- :data:`sim_xp` is the array module (``cupy``'s place): NumPy's functions, with results on
  the simulated device; ``sim_xp.asarray`` / ``sim_xp.array`` copy host data to the device.

Nothing here is fast; the simulation is a tool for tests and kernel debugging.
"""
from __future__ import annotations

import types
from typing import Any

import numpy as np

__all__ = ["SimArray", "sim_xp", "is_sim_array", "to_sim", "to_host"]


def _base(x: Any) -> Any:
    """SimArrays (also inside lists/tuples) as plain ndarray views; the rest unchanged."""
    if type(x) is SimArray:
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_base(v) for v in x)
    return x


def _wrap(x: Any) -> Any:
    """ndarray results (also inside tuples) as SimArrays; NumPy scalars as 0-d SimArrays
    (a reduction on a device gives a 0-d device array)."""
    if type(x) is np.ndarray:
        return x.view(SimArray)
    if isinstance(x, np.generic):
        return np.asarray(x).view(SimArray)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _refuse_host(args: Any, what: str) -> None:
    """Raise on a plain ndarray among the arguments (a host array given to device code)."""
    stack = list(args)
    while stack:
        a = stack.pop()
        if isinstance(a, np.ndarray) and not isinstance(a, SimArray) and a.ndim > 0:
            raise TypeError(f"{what}: a host numpy.ndarray {a.shape} was mixed with arrays on "
                            f"the (simulated) device 'cuda'; move it with "
                            f"sparsecnn.backend.to_device(a, 'cuda') (as with CuPy, where this "
                            f"is an error too)")
        if isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())


class SimArray(np.ndarray):
    """A simulated device array (host memory, device ``"cuda"``); see the module docstring."""

    __array_priority__ = 60

    @property
    def device(self) -> str:
        return "cuda"

    def get(self) -> np.ndarray:
        """A copy in host memory (``numpy.ndarray``), as ``cupy.ndarray.get()``."""
        return np.array(self.view(np.ndarray), copy=True)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host(inputs, f"numpy.{ufunc.__name__}")
        out = kwargs.get("out")
        if out is not None:
            _refuse_host(out, f"numpy.{ufunc.__name__}(out=)")
            kwargs["out"] = _base(out)
        result = getattr(ufunc, method)(*_base(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        _refuse_host(args, f"numpy.{func.__name__}")
        _refuse_host(kwargs, f"numpy.{func.__name__}")
        return _wrap(func(*_base(args), **_base(kwargs)))

    def __reduce__(self):  # pragma: no cover - pickling is not part of the library
        raise TypeError("SimArray cannot be pickled; .get() it first")

    def __repr__(self) -> str:
        return f"SimArray({np.array2string(self.view(np.ndarray))}, device='cuda')"


def is_sim_array(a: Any) -> bool:
    return isinstance(a, SimArray)


def to_sim(a: Any, dtype: Any = None) -> SimArray:
    """A host array (or anything array-like) copied to the simulated device."""
    if isinstance(a, SimArray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return np.array(a, dtype=dtype, copy=True).view(SimArray)


def to_host(a: SimArray) -> np.ndarray:
    return a.get()


# -- the array module ------------------------------------------------------------------------
_HOST_INPUT = {"asarray", "array", "ascontiguousarray", "asfortranarray"}


def _module_function(name: str, f: Any) -> Any:
    if name in _HOST_INPUT:
        def from_host(a, *args, **kwargs):
            if isinstance(a, SimArray):
                return _wrap(f(a.view(np.ndarray), *args, **kwargs))
            # host data to the device: always a copy, as cupy.asarray(numpy_array) is
            return np.array(f(a, *args, **kwargs), copy=True).view(SimArray)
        from_host.__name__ = name
        return from_host

    def device_function(*args, **kwargs):
        _refuse_host(args, f"sim_xp.{name}")
        _refuse_host(kwargs, f"sim_xp.{name}")
        return _wrap(f(*_base(args), **_base(kwargs)))
    device_function.__name__ = name
    return device_function


class _SimRandom(types.ModuleType):
    """``cupy.random``'s place: generators whose draws land on the device."""

    class Generator:
        def __init__(self, bit_generator: Any = None) -> None:
            self._rng = np.random.default_rng(bit_generator)

        def __getattr__(self, name: str) -> Any:
            f = getattr(self._rng, name)
            return (lambda *a, **k: _wrap(f(*a, **k))) if callable(f) else f

    def default_rng(self, seed: Any = None) -> _SimRandom.Generator:
        return _SimRandom.Generator(seed)


class _SimCuda(types.ModuleType):
    """The few ``cupy.cuda`` calls the library makes (synchronisation is a no-op here)."""

    class Device:
        def __init__(self, index: int = 0) -> None:
            self.id = index

        def synchronize(self) -> None:
            return None

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    @staticmethod
    def get_device_id() -> int:
        return 0


class _SimModule(types.ModuleType):
    ndarray = SimArray
    random = _SimRandom("sparsecnn._gpu._arrays.sim_xp.random")
    cuda = _SimCuda("sparsecnn._gpu._arrays.sim_xp.cuda")

    def __getattr__(self, name: str) -> Any:
        f = getattr(np, name)
        if isinstance(f, (types.FunctionType, types.BuiltinFunctionType, np.ufunc)) or (
                callable(f) and not isinstance(f, type)):
            g = f if isinstance(f, np.ufunc) else _module_function(name, f)
            setattr(self, name, g)
            return g
        return f          # dtypes, constants (float32, inf, newaxis, ...)

    @staticmethod
    def asnumpy(a: Any) -> np.ndarray:
        return a.get() if isinstance(a, SimArray) else np.asarray(a)

    @staticmethod
    def get_array_module(*arrays: Any) -> types.ModuleType:
        return sim_xp if any(isinstance(a, SimArray) for a in arrays) else np


#: the array module of the simulated device (what ``cupy`` is on a GPU)
sim_xp = _SimModule("sparsecnn._gpu._arrays.sim_xp")
