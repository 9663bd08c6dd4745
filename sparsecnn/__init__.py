"""sparsecnn: spatially-sparse convolutional networks (B. Graham, arXiv 1409.6070).

>>> import sparsecnn as scn
>>> x = scn.SparseTensor(coords, features, spatial_shape=(96, 96))
>>> model = scn.models.DeepCNet(5, 32, num_classes=100)
>>> loss = scn.cross_entropy(model(x), labels); loss.backward()
"""

__version__ = "0.1.0"

from . import functional, models, optim  # noqa: E402
from .autograd import Parameter, is_grad_enabled, no_grad  # noqa: E402
from .combine import Concat, Residual, add, concat  # noqa: E402
from .deconv import Deconvolution, InverseConvolution, UnPooling  # noqa: E402
from .depthwise import (  # noqa: E402
    DepthwiseConvolution,
    SubmanifoldDepthwiseConvolution,
    depthwise_convolution,
    submanifold_depthwise_convolution,
)
from .fmp import FMPNet, FractionalMaxPooling, fmp_net, fractional_max_pooling  # noqa: E402
from .functional import cross_entropy  # noqa: E402
from .heads import (  # noqa: E402
    GlobalAveragePooling,
    GlobalMaxPooling,
    global_average_pool,
    global_max_pool,
)
from .io import load, save  # noqa: E402
from .losses import site_cross_entropy  # noqa: E402
from .nn import (  # noqa: E402
    AveragePooling,
    BatchNorm,
    Convolution,
    Dropout,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPooling,
    Module,
    NetworkInNetwork,
    ReLU,
    Sequential,
    SparseToDense,
    SubmanifoldConvolution,
)
from .tensor import SparseTensor, Tensor  # noqa: E402

_LAZY = ("data", "train", "stats", "io", "backend")


def __getattr__(name: str):
    """Submodules with heavier imports (data, train, ...) load on first use."""
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SparseTensor", "Tensor", "Parameter", "no_grad", "is_grad_enabled",
    "Module", "Sequential", "Convolution", "SubmanifoldConvolution", "MaxPooling",
    "AveragePooling", "NetworkInNetwork", "ReLU", "LeakyReLU", "Dropout", "BatchNorm",
    "SparseToDense", "Flatten", "Linear", "GlobalMaxPooling", "GlobalAveragePooling",
    "global_max_pool", "global_average_pool", "cross_entropy", "site_cross_entropy", "save",
    "load",
    "add", "concat", "Residual", "Concat",
    "DepthwiseConvolution", "SubmanifoldDepthwiseConvolution", "depthwise_convolution",
    "submanifold_depthwise_convolution",
    "FractionalMaxPooling", "fractional_max_pooling", "FMPNet", "fmp_net",
    "add", "concat", "Residual", "Concat", "Deconvolution", "InverseConvolution", "UnPooling",
    "functional", "models", "optim", "data", "train", "stats", "__version__",
]
