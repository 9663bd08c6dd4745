"""Random sparse inputs and the sparse <-> dense plumbing shared by the tests."""
import numpy as np

import sparsecnn as scn
from tests import dense_reference as ref

RTOL = {np.float32: 2e-4, np.float64: 1e-9}
ATOL = {np.float32: 2e-4, np.float64: 1e-9}


def tol(dtype):
    t = np.dtype(dtype).type
    return dict(rtol=RTOL[t], atol=ATOL[t])


def random_sites(rng, batch, spatial, density):
    """Unique coords (n, 1 + d): density 0 -> none, 'one' -> a single site, 1.0 -> all."""
    total = batch * int(np.prod(spatial))
    if density == "one":
        n = 1
    else:
        n = int(round(density * total))
    flat = np.sort(rng.choice(total, size=n, replace=False))
    rng.shuffle(flat)  # user order is arbitrary
    return np.stack(np.unravel_index(flat, (batch, *spatial)), 1).astype(np.int32)


def random_sparse(rng, batch, spatial, channels, density, dtype=np.float64, ground=True,
                  requires_grad=True, device="cpu"):
    coords = random_sites(rng, batch, spatial, density)
    feats = rng.standard_normal((len(coords), channels)).astype(dtype)
    g = rng.standard_normal(channels).astype(dtype) if ground else None
    x = scn.SparseTensor(coords, feats, spatial, batch_size=batch, ground=g,
                         requires_grad=requires_grad)
    return x.to(device) if device != "cpu" else x


def dense_of(x):
    """Dense (B, C, *spatial) and active mask (B, *spatial) of a sparse tensor (NumPy)."""
    c = np.asarray(scn.backend.to_device(x.coords, "cpu"))
    f = np.asarray(scn.backend.to_device(x.features, "cpu"))
    g = np.asarray(scn.backend.to_device(x.ground, "cpu"))
    return (ref.to_dense(c, f, x.spatial_shape, x.batch_size, g),
            ref.active_mask(c, x.spatial_shape, x.batch_size))


def split_input_grad(x, dense_grad):
    """Dense gradient w.r.t. the input -> (grad at x's active sites, summed over inactive)."""
    c = np.asarray(scn.backend.to_device(x.coords, "cpu"))
    at_sites = ref.gather_sites(dense_grad, c)
    mask = ref.active_mask(c, x.spatial_shape, x.batch_size)
    inactive = np.moveaxis(dense_grad, 1, -1)[~mask].sum(axis=0)
    return at_sites, inactive


def np_(a):
    return None if a is None else np.asarray(scn.backend.to_device(a, "cpu"))


def assert_close(actual, expected, dtype, msg=""):
    np.testing.assert_allclose(np_(actual), expected, err_msg=msg, **tol(dtype))
