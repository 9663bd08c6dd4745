"""Per-layer statistics of a forward pass: active sites and multiply-adds, sparse vs dense.

This is the table behind ``python -m sparsecnn demo`` (the paper's Figure 2 as numbers) and
the per-sample cost reported by the trainer and the benchmarks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .autograd import no_grad
from .nn import (
    AveragePooling,
    Convolution,
    MaxPooling,
    Module,
    NetworkInNetwork,
    Sequential,
    SubmanifoldConvolution,
)
from .tensor import SparseTensor


@dataclass
class LayerStats:
    """One layer of a forward pass (batch totals)."""

    index: int
    layer: str
    spatial_shape: tuple[int, ...]
    channels: int
    active_sites: int
    total_sites: int
    macs_sparse: int
    macs_dense: int

    @property
    def density(self) -> float:
        return self.active_sites / self.total_sites if self.total_sites else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["density"] = self.density
        return d


def _macs(layer: Module, x: SparseTensor, y: SparseTensor) -> tuple[int, int]:
    """(sparse, dense) multiply-adds of one layer for input x and output y."""
    out_sites = y.batch_size * int(np.prod(y.spatial_shape))
    if isinstance(layer, (Convolution, SubmanifoldConvolution)):
        K, cin, cout = layer.weight.shape
        if isinstance(layer, Convolution):
            rb, _ = x.geometry.conv(layer.filter_size, layer.stride)
        else:
            rb = x.geometry.submanifold(layer.filter_size)
        return rb.n_pairs * cin * cout, out_sites * K * cin * cout
    if isinstance(layer, NetworkInNetwork):
        cin, cout = layer.weight.shape
        return y.n_active * cin * cout, out_sites * cin * cout
    from .deconv import Deconvolution, deconv_geometry
    from .depthwise import DepthwiseConvolution, SubmanifoldDepthwiseConvolution
    if isinstance(layer, (DepthwiseConvolution, SubmanifoldDepthwiseConvolution)):
        K, C = layer.weight.shape
        rb = (x.geometry.conv(layer.filter_size, layer.stride)[0]
              if isinstance(layer, DepthwiseConvolution)
              else x.geometry.submanifold(layer.filter_size))
        return rb.n_pairs * C, out_sites * K * C
    if isinstance(layer, Deconvolution):
        K, cin, cout = layer.weight.shape
        rb, _ = deconv_geometry(x.geometry, layer.filter_size, layer.stride)
        in_sites = x.batch_size * int(np.prod(x.spatial_shape))
        return rb.n_pairs * cin * cout, in_sites * K * cin * cout
    return 0, 0   # pooling and pointwise layers: no multiply-adds


def short_name(layer: Module) -> str:
    """'Convolution 3/1 1->32', 'MaxPooling 2/2', 'ReLU', ..."""
    name = type(layer).__name__
    if isinstance(layer, Convolution):
        return (f"{name} {layer.filter_size}/{layer.stride} "
                f"{layer.in_channels}->{layer.out_channels}")
    if isinstance(layer, SubmanifoldConvolution):
        return f"{name} {layer.filter_size} {layer.in_channels}->{layer.out_channels}"
    if isinstance(layer, NetworkInNetwork):
        return f"{name} {layer.in_channels}->{layer.out_channels}"
    if isinstance(layer, (MaxPooling, AveragePooling)):
        return f"{name} {layer.pool_size}/{layer.stride}"
    return name


def layer_stats(model: Module, x: SparseTensor) -> list[LayerStats]:
    """Run ``model``'s sparse layers on ``x`` (no graph) and describe each output.

    ``model`` is a Sequential of sparse layers or a model with a ``features`` Sequential
    (DeepCNet, DeepCNiN). Row 0 describes the input. The pass runs in eval mode (no
    dropout, no batch-statistics update), so it leaves the model's state untouched. Layers
    that the forward runs as one fused kernel are marked ``[fused first-last]`` (layer
    indices from 0, as in the Sequential's repr).
    """
    body = model if isinstance(model, Sequential) else getattr(model, "features", None)
    if not isinstance(body, Sequential):
        raise TypeError("layer_stats needs a Sequential or a model with a .features Sequential")
    rows = [LayerStats(0, "input", x.spatial_shape, x.channels, x.n_active,
                       x.batch_size * int(np.prod(x.spatial_shape)), 0, 0)]
    was_training = model.training
    model.eval()
    fused = {i: f"fused {start}-{stop - 1}" for kind, start, stop, _ in body.fusion_plan()
             if kind for i in range(start, stop)}
    with no_grad():
        h = x
        for i, layer in enumerate(body, 1):
            y = layer(h)      # layer by layer, for every intermediate size
            if not isinstance(y, SparseTensor):
                break
            sp, de = _macs(layer, h, y)
            name = short_name(layer) + (f" [{fused[i - 1]}]" if i - 1 in fused else "")
            rows.append(LayerStats(i, name, y.spatial_shape, y.channels, y.n_active,
                                   y.batch_size * int(np.prod(y.spatial_shape)), sp, de))
            h = y
    model.train(was_training)
    return rows


def total_macs(rows: list[LayerStats]) -> tuple[int, int]:
    """(sparse, dense) multiply-adds summed over the layers."""
    return sum(r.macs_sparse for r in rows), sum(r.macs_dense for r in rows)


def format_table(rows: list[LayerStats]) -> str:
    """Plain-text table: size, active sites, % active, multiply-adds sparse vs dense."""
    head = (f"{'#':>2}  {'layer':<30} {'size':>9} {'C':>4} {'active':>9} {'% active':>8} "
            f"{'MACs sparse':>13} {'MACs dense':>13} {'ratio':>6}")
    width = max([30] + [len(r.layer) for r in rows])
    head = head.replace(f"{'layer':<30}", f"{'layer':<{width}}")
    lines = [head, "-" * len(head)]
    for r in rows:
        size = "x".join(str(n) for n in r.spatial_shape)
        ratio = f"{r.macs_dense / r.macs_sparse:6.1f}" if r.macs_sparse else "     -"
        lines.append(f"{r.index:>2}  {r.layer:<{width}} {size:>9} {r.channels:>4} "
                     f"{r.active_sites:>9,} {100 * r.density:>7.2f}% {r.macs_sparse:>13,} "
                     f"{r.macs_dense:>13,} {ratio}")
    sp, de = total_macs(rows)
    lines.append("-" * len(head))
    ratio = f"{de / sp:6.1f}" if sp else "     -"
    lines.append(f"{'':>2}  {'total':<{width}} {'':>9} {'':>4} {'':>9} {'':>8} {sp:>13,} {de:>13,} "
                 f"{ratio}")
    return "\n".join(lines)
