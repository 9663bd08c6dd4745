"""Tests for :mod:`sparsecnn.optim`."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest

from sparsecnn.optim import SGD, CosineLR, ExponentialLR, StepLR, clip_grad_norm


class P:
    """Minimal stand-in for a Parameter: ``.data`` and ``.grad`` only."""

    def __init__(self, data, grad=None, dtype=np.float64):
        self.data = np.array(data, dtype=dtype)
        self.grad = grad


def run_scalar(grads, p0=1.0, **kwargs):
    """Run SGD on a single 1-element parameter; return the values after each step."""
    p = P([p0])
    opt = SGD([p], **kwargs)
    out = []
    for g in grads:
        p.grad = None if g is None else np.array([g])
        opt.step()
        out.append(float(p.data[0]))
    return out


GRADS = [1.0, 2.0, -1.0]


# ---------------------------------------------------------------------------
# update rules against hand computation
# ---------------------------------------------------------------------------


def test_plain_sgd_two_params():
    a = P([1.0, -2.0])
    opt = SGD([a], lr=0.1)
    for g in ([0.5, 1.0], [-1.0, 0.5], [2.0, 0.0]):
        a.grad = np.array(g)
        opt.step()
    # [1 - .05 + .1 - .2, -2 - .1 - .05 - 0]
    np.testing.assert_allclose(a.data, [0.85, -2.15], rtol=1e-12)


def test_plain_sgd_steps():
    # p = 1 - 0.1*1 = 0.9; 0.9 - 0.2 = 0.7; 0.7 + 0.1 = 0.8
    assert run_scalar(GRADS, lr=0.1) == pytest.approx([0.9, 0.7, 0.8], rel=1e-12)


def test_momentum():
    # buf: 1 -> 0.9*1+2 = 2.9 -> 0.9*2.9-1 = 1.61
    # p:   1-0.1 = 0.9 -> 0.9-0.29 = 0.61 -> 0.61-0.161 = 0.449
    got = run_scalar(GRADS, lr=0.1, momentum=0.9)
    assert got == pytest.approx([0.9, 0.61, 0.449], rel=1e-12)


def test_nesterov():
    # buf as in test_momentum; g = grad + 0.9*buf:
    # 1+0.9 = 1.9 -> 2+2.61 = 4.61 -> -1+1.449 = 0.449
    # p: 1-0.19 = 0.81 -> 0.81-0.461 = 0.349 -> 0.349-0.0449 = 0.3041
    got = run_scalar(GRADS, lr=0.1, momentum=0.9, nesterov=True)
    assert got == pytest.approx([0.81, 0.349, 0.3041], rel=1e-12)


def test_weight_decay():
    # g = grad + 0.1*p
    # g1 = 1.1,      p = 1 - 0.11 = 0.89
    # g2 = 2.089,    p = 0.89 - 0.2089 = 0.6811
    # g3 = -0.93189, p = 0.6811 + 0.093189 = 0.774289
    got = run_scalar(GRADS, lr=0.1, weight_decay=0.1)
    assert got == pytest.approx([0.89, 0.6811, 0.774289], rel=1e-12)


def test_dampening():
    # buf: 1 (no dampening on first step) -> 0.9 + 0.5*2 = 1.9 -> 1.71 - 0.5 = 1.21
    # p: 0.9 -> 0.9 - 0.19 = 0.71 -> 0.71 - 0.121 = 0.589
    got = run_scalar(GRADS, lr=0.1, momentum=0.9, dampening=0.5)
    assert got == pytest.approx([0.9, 0.71, 0.589], rel=1e-12)


def test_momentum_and_weight_decay():
    # g1 = 1.1,      buf = 1.1,                       p = 0.89
    # g2 = 2.089,    buf = 0.99 + 2.089 = 3.079,      p = 0.89 - 0.3079 = 0.5821
    # g3 = -0.94179, buf = 2.7711 - 0.94179 = 1.82931, p = 0.5821 - 0.182931 = 0.399169
    got = run_scalar(GRADS, lr=0.1, momentum=0.9, weight_decay=0.1)
    assert got == pytest.approx([0.89, 0.5821, 0.399169], rel=1e-12)


def test_none_grad_is_skipped_and_buffer_kept():
    # step 2 has no grad: parameter and momentum buffer unchanged
    # buf: 1 -> (skip) -> 0.9*1 + 2 = 2.9 ; p: 0.9 -> 0.9 -> 0.9 - 0.29 = 0.61
    got = run_scalar([1.0, None, 2.0], lr=0.1, momentum=0.9)
    assert got == pytest.approx([0.9, 0.9, 0.61], rel=1e-12)


def test_none_grad_other_params_still_updated():
    a, b = P([1.0]), P([5.0])
    opt = SGD([a, b], lr=0.5, weight_decay=0.1)
    a.grad = np.array([2.0])
    opt.step()
    assert a.data[0] == pytest.approx(1.0 - 0.5 * 2.1)
    assert b.data[0] == 5.0  # weight decay not applied without a grad
    assert opt.state_dict()["momentum_buffers"] == [None, None]


def test_step_does_not_modify_grad():
    p = P([1.0, 2.0])
    g = np.array([0.5, -0.5])
    p.grad = g
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()
    opt.step()
    np.testing.assert_array_equal(g, [0.5, -0.5])


def test_zero_grad():
    a, b = P([1.0], np.array([1.0])), P([2.0], np.array([3.0]))
    opt = SGD([a, b], lr=0.1)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    opt.step()  # nothing to do
    assert a.data[0] == 1.0 and b.data[0] == 2.0


def test_lr_is_writable():
    got = []
    p = P([1.0])
    opt = SGD([p], lr=0.1)
    for lr in (0.1, 0.5, 0.0):
        opt.lr = lr
        p.grad = np.array([1.0])
        opt.step()
        got.append(float(p.data[0]))
    assert got == pytest.approx([0.9, 0.4, 0.4])
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -0.1


def test_float32_stays_float32():
    p = P(np.arange(6).reshape(2, 3), dtype=np.float32)
    opt = SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ref = p.data.copy()
    buf = None
    for step in range(3):
        g = np.full((2, 3), 0.5 + step, dtype=np.float32)
        p.grad = g
        opt.step()
        gg = g + np.float32(1e-4) * ref
        buf = gg.copy() if buf is None else np.float32(0.9) * buf + gg
        ref = ref - np.float32(0.1) * (gg + np.float32(0.9) * buf)
        assert p.data.dtype == np.float32
    assert opt.momentum_buffers[0].dtype == np.float32
    np.testing.assert_allclose(p.data, ref, rtol=1e-6)
    # a float64 gradient is cast to the parameter's dtype
    p.grad = np.ones((2, 3), dtype=np.float64)
    opt.step()
    assert p.data.dtype == np.float32
    assert opt.momentum_buffers[0].dtype == np.float32
    assert opt.state_dict()["momentum_buffers"][0].dtype == np.float32


def test_grad_shape_mismatch():
    p = P([1.0, 2.0], np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        SGD([p], lr=0.1).step()


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(lr=-0.1), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr="0.1"), TypeError, "lr"),
        (dict(lr=0.1, momentum=1.0), ValueError, "momentum"),
        (dict(lr=0.1, momentum=-0.1), ValueError, "momentum"),
        (dict(lr=0.1, nesterov=True), ValueError, "nesterov"),
        (dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), ValueError, "nesterov"),
        (dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay"),
        (dict(lr=0.1, momentum=0.9, dampening=1.5), ValueError, "dampening"),
    ],
)
def test_hyperparameter_validation(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        SGD([P([1.0])], **kwargs)


def test_params_validation():
    with pytest.raises(ValueError, match="params"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="params"):
        SGD(iter([]), lr=0.1)
    with pytest.raises(TypeError, match="params"):
        SGD([object()], lr=0.1)
    with pytest.raises(TypeError, match="params"):
        SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(TypeError, match="params"):
        SGD(P([1.0]), lr=0.1)  # a single parameter, not a list
    with pytest.raises(TypeError, match="params"):
        SGD(42, lr=0.1)
    with pytest.raises(TypeError, match="params"):
        SGD([P([1, 2], dtype=np.int64)], lr=0.1)
    p = P([1.0])
    with pytest.raises(ValueError, match="params"):
        SGD([p, p], lr=0.1)


def test_generator_params_accepted():
    ps = [P([1.0], np.array([1.0])), P([2.0], np.array([1.0]))]
    opt = SGD((p for p in ps), lr=1.0)
    opt.step()
    assert [float(p.data[0]) for p in ps] == [0.0, 1.0]


# ---------------------------------------------------------------------------
# state_dict / exact resume
# ---------------------------------------------------------------------------


def _grads(step, shapes, dtype):
    rng = np.random.default_rng(1000 + step)
    out = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if step % 3 == 1:
        out[1] = None  # exercise skipped parameters
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_exact_resume(dtype):
    shapes = [(3, 4), (5,), (2, 2, 2)]
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)

    # uninterrupted run of 6 steps with a per-step schedule
    ref = [P(x.copy(), dtype=dtype) for x in init]
    opt = SGD(ref, **kw)
    sched = ExponentialLR(opt, gamma=0.1)
    for step in range(6):
        for p, g in zip(ref, _grads(step, shapes, dtype)):
            p.grad = g
        opt.step()
        sched.step()

    # interrupted after 3 steps, state saved (through pickle) and resumed
    ps = [P(x.copy(), dtype=dtype) for x in init]
    opt = SGD(ps, **kw)
    sched = ExponentialLR(opt, gamma=0.1)
    for step in range(3):
        for p, g in zip(ps, _grads(step, shapes, dtype)):
            p.grad = g
        opt.step()
        sched.step()
    saved = pickle.dumps(
        {
            "params": [p.data.copy() for p in ps],
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        }
    )
    # keep going in the old run: must not affect the saved state
    for p in ps:
        p.grad = np.ones_like(p.data)
    opt.step()

    ck = pickle.loads(saved)
    ps2 = [P(x, dtype=dtype) for x in ck["params"]]
    opt2 = SGD(ps2, lr=123.0)  # hyper-parameters come from the state dict
    sched2 = ExponentialLR(opt2, gamma=0.1)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.lr == pytest.approx(0.05 * math.exp(-0.3))
    assert sched2.epoch == 3
    for step in range(3, 6):
        for p, g in zip(ps2, _grads(step, shapes, dtype)):
            p.grad = g
        opt2.step()
        sched2.step()

    for a, b in zip(ref, ps2):
        assert a.data.dtype == b.data.dtype == dtype
        np.testing.assert_array_equal(a.data, b.data)
    for a, b in zip(opt.momentum_buffers, opt2.momentum_buffers):
        assert (a is None) == (b is None)


def test_state_dict_contents_and_copies():
    p, q = P([1.0, 2.0]), P([3.0])
    opt = SGD([p, q], lr=0.1, momentum=0.5)
    p.grad = np.array([1.0, 1.0])
    opt.step()
    sd = opt.state_dict()
    assert sd["lr"] == 0.1 and sd["momentum"] == 0.5 and sd["nesterov"] is False
    assert sd["momentum_buffers"][1] is None
    np.testing.assert_array_equal(sd["momentum_buffers"][0], [1.0, 1.0])
    opt.step()  # buffer changes in the optimiser, not in the saved dict
    np.testing.assert_array_equal(sd["momentum_buffers"][0], [1.0, 1.0])
    # loading copies too
    opt2 = SGD([p, q], lr=1.0)
    opt2.load_state_dict(sd)
    sd["momentum_buffers"][0][:] = 99.0
    np.testing.assert_array_equal(opt2.momentum_buffers[0], [1.0, 1.0])


def test_load_state_dict_mismatch():
    opt = SGD([P([1.0]), P([2.0])], lr=0.1, momentum=0.9)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="momentum buffers"):
        SGD([P([1.0])], lr=0.1).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["momentum_buffers"][0] = np.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["lr"]
    with pytest.raises(KeyError):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["momentum"] = 2.0
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(bad)
    assert opt.momentum == 0.9  # unchanged after a failed load


# ---------------------------------------------------------------------------
# clip_grad_norm
# ---------------------------------------------------------------------------


def test_clip_grad_norm_below_threshold():
    a, b = P([0.0, 0.0], np.array([3.0, 0.0])), P([0.0], np.array([4.0]))
    c = P([0.0])  # no grad: ignored
    norm = clip_grad_norm([a, b, c], max_norm=10.0)
    assert isinstance(norm, float) and norm == pytest.approx(5.0)
    np.testing.assert_array_equal(a.grad, [3.0, 0.0])
    np.testing.assert_array_equal(b.grad, [4.0])
    assert c.grad is None


def test_clip_grad_norm_scales_in_place():
    ga, gb = np.array([3.0, 0.0]), np.array([4.0])
    a, b = P([0.0, 0.0], ga), P([0.0], gb)
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert a.grad is ga and b.grad is gb  # scaled in place
    np.testing.assert_allclose(ga, [0.6, 0.0], rtol=1e-12)
    np.testing.assert_allclose(gb, [0.8], rtol=1e-12)
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(1.0)


def test_clip_grad_norm_float32_and_large_values():
    g = np.array([3e30, 4e30], dtype=np.float32)  # squares overflow float32
    p = P([0.0, 0.0], g, dtype=np.float32)
    norm = clip_grad_norm([p], 1.0)
    assert norm == pytest.approx(5e30, rel=1e-6)
    assert p.grad.dtype == np.float32
    np.testing.assert_allclose(p.grad, [0.6, 0.8], rtol=1e-6)


def test_clip_grad_norm_no_grads():
    assert clip_grad_norm([P([1.0])], 1.0) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_grad_norm_nonfinite(bad):
    g = np.array([1.0, bad])
    p = P([0.0, 0.0], g)
    with pytest.raises(FloatingPointError, match="non-finite"):
        clip_grad_norm([p], 1.0)
    assert g[0] == 1.0  # untouched


def test_clip_grad_norm_validation():
    p = P([0.0], np.array([1.0]))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([p], 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([p], -1.0)
    with pytest.raises(TypeError, match="params"):
        clip_grad_norm([1, 2], 1.0)


# ---------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------


def test_exponential_lr_values():
    opt = SGD([P([1.0])], lr=0.1)
    s = ExponentialLR(opt, gamma=0.5)
    assert s(0) == pytest.approx(0.1)
    assert s(2) == pytest.approx(0.1 * math.exp(-1.0))  # 0.036787944...
    assert s(2) == pytest.approx(0.036787944117144235, rel=1e-12)
    assert s(1.5) == pytest.approx(0.1 * math.exp(-0.75))
    assert s.epoch == 0 and opt.lr == 0.1  # calling does not change state
    assert s.step() == pytest.approx(0.1 * math.exp(-0.5))
    assert s.epoch == 1 and opt.lr == pytest.approx(0.1 * math.exp(-0.5))
    s.step(epoch=2.5)  # fractional epoch (per-step use)
    assert s.epoch == 2.5 and opt.lr == pytest.approx(0.1 * math.exp(-1.25))
    s.step()
    assert s.epoch == 3.5


def test_step_lr_values():
    opt = SGD([P([1.0])], lr=1.0)
    s = StepLR(opt, step_size=3, gamma=0.1)
    expected = {0: 1.0, 2: 1.0, 2.9: 1.0, 3: 0.1, 5: 0.1, 6: 0.01, 9.5: 0.001}
    for e, lr in expected.items():
        assert s(e) == pytest.approx(lr, rel=1e-12), e
    lrs = [s.step() for _ in range(7)]  # epochs 1..7
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert opt.lr == pytest.approx(0.01)
    assert StepLR(opt, 2)(2) == pytest.approx(0.001)  # default gamma 0.1, lr0 = 0.01


def test_cosine_lr_values():
    opt = SGD([P([1.0])], lr=1.0)
    s = CosineLR(opt, total_epochs=4, min_lr=0.2)
    assert s(0) == pytest.approx(1.0)
    assert s(1) == pytest.approx(0.2 + 0.4 * (1 + math.sqrt(0.5)))  # 0.88284...
    assert s(2) == pytest.approx(0.6)
    assert s(4) == pytest.approx(0.2)
    assert s(10) == pytest.approx(0.2)  # stays at min_lr
    assert CosineLR(opt, total_epochs=2)(1) == pytest.approx(0.5)  # min_lr 0


def test_schedule_state_dict_roundtrip():
    opt = SGD([P([1.0])], lr=0.4)
    s = StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        s.step()
    sd = s.state_dict()
    assert sd["epoch"] == 3 and sd["lr0"] == 0.4
    opt2 = SGD([P([1.0])], lr=7.0)
    s2 = StepLR(opt2, step_size=2, gamma=0.5)
    s2.load_state_dict(sd)
    assert s2.epoch == 3 and s2.lr0 == 0.4
    assert opt2.lr == pytest.approx(0.2)
    assert s2.step() == s.step() == pytest.approx(0.1)

    c = CosineLR(opt, total_epochs=10, min_lr=0.01)
    c.step(epoch=4.25)
    c2 = CosineLR(opt2, total_epochs=1)
    c2.load_state_dict(c.state_dict())
    assert c2.total_epochs == 10 and c2.min_lr == 0.01
    assert opt2.lr == pytest.approx(c(4.25))


def test_schedule_validation():
    opt = SGD([P([1.0])], lr=0.1)
    with pytest.raises(ValueError, match="gamma"):
        ExponentialLR(opt, gamma=-1.0)
    with pytest.raises(ValueError, match="step_size"):
        StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="gamma"):
        StepLR(opt, step_size=1, gamma=0.0)
    with pytest.raises(ValueError, match="total_epochs"):
        CosineLR(opt, total_epochs=0)
    with pytest.raises(ValueError, match="min_lr"):
        CosineLR(opt, total_epochs=5, min_lr=-1.0)
    s = ExponentialLR(opt, gamma=0.1)
    with pytest.raises(ValueError, match="epoch"):
        s(-1)
    with pytest.raises(ValueError, match="epoch"):
        s.step(epoch=-0.5)
    assert s.epoch == 0
    with pytest.raises(TypeError, match="lr"):
        ExponentialLR(object(), gamma=0.1)
