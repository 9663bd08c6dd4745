"""Tests for :mod:`sparsecnn.metrics`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparsecnn.metrics import MetricTracker, RunningMean, accuracy, topk_accuracy

LOGITS = np.array(
    [
        [0.1, 0.5, 0.4],  # label 1: best                    -> top-1
        [0.9, 0.05, 0.05],  # label 1: 0.9 above, 0.05 tied  -> top-3 only
        [0.2, 0.3, 0.5],  # label 1: 0.5 above               -> top-2
        [0.3, 0.4, 0.3],  # label 2: 0.4 above, 0.3 tied     -> top-3 only
    ]
)
LABELS = np.array([1, 1, 1, 2])


def test_accuracy_hand_case():
    assert accuracy(LOGITS, LABELS) == 0.25
    assert accuracy(LOGITS, LABELS, topk=2) == 0.5
    assert accuracy(LOGITS, LABELS, topk=3) == 1.0
    assert isinstance(accuracy(LOGITS, LABELS), float)


def test_topk_accuracy_dict():
    got = topk_accuracy(LOGITS, LABELS, ks=(1, 2, 3))
    assert got == {1: 0.25, 2: 0.5, 3: 1.0}
    assert all(isinstance(v, float) for v in got.values())


def test_topk_default_and_k_larger_than_classes():
    assert topk_accuracy(LOGITS, LABELS) == {1: 0.25, 5: 1.0}


def test_simple_top1():
    assert accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1]) == 0.5
    assert accuracy(np.eye(4, dtype=np.float32), np.arange(4)) == 1.0
    assert accuracy(np.eye(4, dtype=np.float32), np.array([1, 2, 3, 0])) == 0.0
    assert accuracy(np.array([[1, 5, 2]]), np.array([1], dtype=np.int32)) == 1.0


def test_ties_count_against():
    # constant logits: every other class ties with the label
    z = np.zeros((4, 3))
    assert topk_accuracy(z, [0, 1, 2, 0], ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    # two-way tie for first place: not top-1, but top-2
    t = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert accuracy(t, [0, 1]) == 0.0
    assert accuracy(t, [0, 1], topk=2) == 1.0
    # tie below the label does not matter
    assert accuracy([[2.0, 1.0, 1.0]], [0]) == 1.0
    # infinite scores compare normally
    assert accuracy([[np.inf, 0.0], [-np.inf, 0.0]], [0, 1]) == 1.0


def test_device_input_is_converted():
    """Device arrays (here the CUDA simulation's) are copied to the host."""
    from sparsecnn._gpu._arrays import to_sim
    assert accuracy(to_sim(LOGITS), to_sim(LABELS), topk=2) == 0.5


@pytest.mark.parametrize(
    "logits, labels, exc, match",
    [
        (np.zeros((4, 3)), np.zeros(3, dtype=int), ValueError, "shape mismatch"),
        (np.zeros(3), np.zeros(3, dtype=int), ValueError, "2-D"),
        (np.zeros((2, 3)), np.zeros((2, 1), dtype=int), ValueError, "1-D"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), ValueError, "empty"),
        (np.zeros((2, 3)), np.array([0, 3]), ValueError, "labels"),
        (np.zeros((2, 3)), np.array([-1, 0]), ValueError, "labels"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), TypeError, "integer"),
        (np.array([[0.0, np.nan]]), np.array([0]), ValueError, "NaN"),
    ],
)
def test_input_errors(logits, labels, exc, match):
    with pytest.raises(exc, match=match):
        accuracy(logits, labels)


def test_k_errors():
    with pytest.raises(ValueError, match="topk"):
        accuracy(LOGITS, LABELS, topk=0)
    with pytest.raises(TypeError, match="topk"):
        accuracy(LOGITS, LABELS, topk=1.5)
    with pytest.raises(TypeError, match="topk"):
        accuracy(LOGITS, LABELS, topk=True)
    with pytest.raises(ValueError, match="ks"):
        topk_accuracy(LOGITS, LABELS, ks=())
    with pytest.raises(ValueError, match="k"):
        topk_accuracy(LOGITS, LABELS, ks=(1, -2))


def test_running_mean_weighted():
    m = RunningMean()
    assert math.isnan(m.mean) and m.count == 0
    m.update(1.0, n=3)
    m.update(np.float32(3.0), n=1)
    assert m.mean == pytest.approx(1.5)
    assert m.count == 4 and m.total == pytest.approx(6.0)
    m.update(np.array(100.0), n=0)  # zero weight: ignored
    assert m.mean == pytest.approx(1.5)
    m.update(np.array([5.5]))  # size-1 array, default weight 1
    assert m.mean == pytest.approx(11.5 / 5)
    assert float(m) == m.mean
    m.reset()
    assert math.isnan(m.mean)


def test_running_mean_errors():
    m = RunningMean()
    with pytest.raises(ValueError, match="n"):
        m.update(1.0, n=-1)
    with pytest.raises(ValueError, match="scalar"):
        m.update(np.ones(2))
    with pytest.raises(TypeError, match="value"):
        m.update("1.0")
    assert m.count == 0


def test_metric_tracker():
    t = MetricTracker(["loss"])
    assert "loss" in t and math.isnan(t["loss"])
    t.update(n=2, loss=1.0, acc=0.5)
    t.update(n=6, loss=3.0, acc=1.0)
    assert t["loss"] == pytest.approx(2.5)
    assert t["acc"] == pytest.approx(0.875)
    assert t.means() == pytest.approx({"loss": 2.5, "acc": 0.875})
    assert list(t.means()) == ["loss", "acc"]
    assert t.summary() == "loss=2.5000 acc=0.8750"
    t.update({"n": 4.0}, n=1)  # a metric literally called "n"
    assert t["n"] == 4.0
    with pytest.raises(TypeError):
        t.update(n=1, loss="bad", acc=1.0)
    assert t["acc"] == pytest.approx(0.875)  # failed update left state alone
    t.reset()
    assert math.isnan(t["loss"]) and "acc" in t
    with pytest.raises(KeyError):
        t["missing"]
