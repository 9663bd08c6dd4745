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
    """A random SparseTensor; on a device it is built there from device arrays (a leaf, so
    its .grad is filled)."""
    coords = random_sites(rng, batch, spatial, density)
    feats = rng.standard_normal((len(coords), channels)).astype(dtype)
    g = rng.standard_normal(channels).astype(dtype) if ground else None
    if device != "cpu":
        coords, feats = (scn.backend.to_device(a, device) for a in (coords, feats))
        g = None if g is None else scn.backend.to_device(g, device)
    return scn.SparseTensor(coords, feats, spatial, batch_size=batch, ground=g,
                            requires_grad=requires_grad)


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


def set_params(layer, rng, dtype):
    """Standard-normal values for every parameter of ``layer`` (non-zero biases too)."""
    for p in layer.parameters():
        p.data = rng.standard_normal(p.shape).astype(dtype)


def backprop(y, rng):
    """A random upstream gradient through ``y.to_dense()``; returns it (host array)."""
    yd = y.to_dense()
    G = rng.standard_normal(yd.shape).astype(yd.dtype)
    yd.backward(G)
    return G


def check_input_grads(x, gx_dense, dtype, extra_ground=0.0):
    """``x.grad`` and ``x.ground_grad`` against the dense gradient of the input."""
    at_sites, inactive = split_input_grad(x, gx_dense)
    assert_close(x.grad, at_sites, dtype, "input grad at active sites")
    assert_close(x.ground_grad, inactive + extra_ground, dtype, "ground grad")


def oracle_net(layers):
    """(layer specs, param arrays) of library layers (a Sequential or a list) for
    ref.net_forward / ref.net_backward, in each layer's current mode (ground state, train /
    eval); the arrays are those of ``parameters()`` order, None for a missing bias. Read it
    before the forward: a training-mode BatchNorm updates its running statistics."""
    specs, params = [], []
    for m in layers:
        gs = m.ground_state
        if isinstance(m, scn.Convolution | scn.SubmanifoldConvolution | scn.NetworkInNetwork
                      | scn.Linear):
            params += [np_(m.weight.data).copy(), None if m.bias is None else np_(m.bias.data)]
        if isinstance(m, scn.Convolution):
            specs.append(("conv", m.filter_size, m.stride, gs))
        elif isinstance(m, scn.SubmanifoldConvolution):
            specs.append(("subm", m.filter_size, gs))
        elif isinstance(m, scn.NetworkInNetwork):
            specs.append(("nin", gs))
        elif isinstance(m, scn.Linear):
            specs.append(("linear",))
        elif isinstance(m, scn.MaxPooling | scn.AveragePooling):
            kind = "maxpool" if isinstance(m, scn.MaxPooling) else "avgpool"
            specs.append((kind, m.pool_size, m.stride, gs))
        elif isinstance(m, scn.ReLU | scn.LeakyReLU):
            specs.append(("act", 0.0 if isinstance(m, scn.ReLU) else m.negative_slope))
        elif isinstance(m, scn.BatchNorm):
            stats = (None, None) if m.training else (np_(m.running_mean).copy(),
                                                     np_(m.running_var).copy())
            specs.append(("bn", gs, m.eps, *stats))
            params += [np_(m.weight.data).copy(), np_(m.bias.data).copy()]
        elif isinstance(m, scn.Dropout):
            if m.training and m.p > 0:
                raise ValueError("a training-mode Dropout has no dense oracle")
        elif not isinstance(m, scn.SparseToDense | scn.Flatten):
            raise TypeError(f"no oracle spec for {type(m).__name__}")
    return specs, params


def oracle_input(x):
    """(dense features (B, C, *N), active mask (B, *N), ground (C,)) of a SparseTensor."""
    xd, mask = dense_of(x)
    return xd, mask, np_(x.ground)


def check_net(net, x, rng, close=None):
    """Run ``net`` (library layers: a Sequential, a DeepCNet, ...) on SparseTensor ``x`` and
    compare against ref.net_forward / ref.net_backward: the output at every site (and its
    active set and ground) or the logits, then, for a random upstream gradient, every
    parameter's gradient and the input's (active features and ground). ``close(actual,
    expected, what, scale)`` compares (default: assert_close at x's dtype); ``scale`` is the
    largest magnitude among the arrays of its kind (the outputs, or all the gradients): where
    a gradient is a cancellation of terms that large, rounding leaves an error of its
    order. Returns the output."""
    if close is None:
        def close(a, e, what, scale):
            assert_close(a, e, x.dtype, what)
    layers = list(net.features) + [net.classifier] if hasattr(net, "classifier") else list(net)
    specs, params = oracle_net(layers)
    xd, mask, g = oracle_input(x)
    y_ref, mask_ref, g_ref = ref.net_forward(xd, mask, g, specs, params)
    y = net(x)
    if isinstance(y, scn.SparseTensor):
        _, y_mask = dense_of(y)
        np.testing.assert_array_equal(y_mask, mask_ref, err_msg="active output sites")
        yd = y.to_dense()
    else:
        yd = y
    y_scale = _maxabs(y_ref)
    if isinstance(y, scn.SparseTensor):
        close(y.ground, g_ref, "output ground", max(y_scale, _maxabs(g_ref)))
    close(yd.numpy(), y_ref, "forward", y_scale)
    G = rng.standard_normal(yd.shape).astype(yd.dtype)
    yd.backward(G)
    gx, gg, gparams = ref.net_backward(xd, mask, g, specs, params, G)
    live = [gp for gp, p in zip(gparams, params, strict=True) if p is not None]
    ps = net.parameters()
    assert len(ps) == len(live)
    c = np.asarray(scn.backend.to_device(x.coords, "cpu"))
    gx = ref.gather_sites(gx, c)
    g_scale = max(_maxabs(a) for a in [gx, gg, *live])
    for i, (p, gp) in enumerate(zip(ps, live, strict=True)):
        close(p.grad, gp, f"param {i} {p.shape}", g_scale)
    close(x.grad, gx, "input grad at active sites", g_scale)
    close(x.ground_grad, gg, "input ground grad", g_scale)
    return y


def _maxabs(a):
    a = np.asarray(a)
    return float(np.abs(a).max()) if a.size else 0.0
