"""Trainer: learns, resumes exactly, is deterministic, guards divergence; CLI smoke tests."""
import json
import re

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import data
from sparsecnn import train as T
from sparsecnn.cli import main
from tests.sparse_helpers import np_

FAST = dict(batch_size=16, lr=0.02, lr_decay=0.05, progress=False)


def _model(seed=0, dropout=0.0):
    return scn.models.DeepCNet(3, 8, num_classes=6, activation="vleaky", dropout=dropout,
                               seed=seed)


@pytest.fixture(scope="module")
def strokes():
    return (data.synthetic_strokes(6, 16, seed=0), data.synthetic_strokes(6, 8, seed=1))


def test_training_learns(strokes):
    train, test = strokes
    model = _model()
    before = T.evaluate(model, test)
    hist = T.fit(model, train, test, epochs=8, **FAST)
    after = hist[-1]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert after["test_accuracy"] >= 0.6, hist          # chance is 1/6
    assert after["test_loss"] < before["loss"]
    assert hist[0]["macs_per_sample"] > 0 and len(hist[0]["active_sites_per_sample"]) > 3


def _weights(model):
    return [p.data.copy() for p in model.parameters()]


def test_fixed_seed_identical_runs(strokes, device):
    train, _ = strokes
    a, b = _model(), _model()
    T.fit(a, train, epochs=2, device=device, **FAST)
    T.fit(b, train, epochs=2, device=device, **FAST)
    for x, y in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(np_(x), np_(y))


def test_checkpoint_exact_resume(strokes, tmp_path):
    train, _ = strokes
    full = _model(dropout=0.3)
    T.fit(full, train, epochs=3, **FAST)
    ck = tmp_path / "ck.npz"
    part = _model(dropout=0.3)
    T.fit(part, train, epochs=2, checkpoint=ck, **FAST)
    resumed = _model(seed=99, dropout=0.3)   # other init: everything comes from the file
    hist = T.fit(resumed, train, epochs=3, checkpoint=ck, resume=True, **FAST)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for x, y in zip(_weights(full), _weights(resumed)):
        np.testing.assert_array_equal(x, y)


def test_divergence_is_reported(strokes):
    train, _ = strokes
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        T.fit(_model(), train, epochs=3, batch_size=16, lr=1e6, progress=False)


def test_bad_settings(strokes):
    train, _ = strokes
    with pytest.raises(ValueError, match="epochs"):
        T.fit(_model(), train, epochs=0, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        T.fit(_model(), train, schedule="linear", progress=False)
    with pytest.raises(TypeError):
        T.fit(_model(), train, no_such_setting=1, progress=False)


def test_predict_probabilities(strokes):
    train, _ = strokes
    model = _model()
    p = T.predict(model, train.samples[:5])
    assert p.shape == (5, 6)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)


def test_jsonl_log_and_metrics(strokes, tmp_path):
    train, test = strokes
    log = tmp_path / "log.jsonl"
    T.fit(_model(), train, test, epochs=2, log=log, **FAST)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_accuracy", "lr", "samples_per_second",
            "test_accuracy", "test_top5"} <= set(rows[-1])


def test_cli_info_and_demo(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "OpenMP" in out and "BLAS" in out and "GPU" in out
    assert main(["demo", "--l", "3", "--k", "8"]) == 0
    out = capsys.readouterr().out
    assert "MACs sparse" in out and "total" in out


def test_cli_train_predict_evaluate(tmp_path, capsys, device):
    out = tmp_path / "m.npz"
    assert main(["train", "--data", "synthetic", "--classes", "4", "--l", "3", "--k", "8",
                 "--epochs", "2", "--repeats", "1", "--quiet", "--out", str(out),
                 "--batch-size", "16", "--eval-every", "1", "--device", device]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and out.exists()
    sample = data.synthetic_strokes(4, 1, seed=5).samples[0]
    js = tmp_path / "s.json"
    js.write_text(json.dumps([s.tolist() for s in sample]))
    assert main(["predict", str(out), str(js), "--device", device]) == 0
    top = json.loads(capsys.readouterr().out)
    assert len(top) == 4 and abs(sum(t["probability"] for t in top) - 1) < 1e-4
    assert main(["evaluate", str(out), "--data", "synthetic", "--classes", "4",
                 "--quiet", "--device", device]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_predict_bad_file(tmp_path, capsys):
    out = tmp_path / "m.npz"
    scn.save(_model(), out)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[["a", "b"]]]))
    assert main(["predict", str(out), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsecnn predict: error: ") and "bad.json" in err
    assert "must be a point [x, y] of two numbers" in err


def test_cli_show(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "show.png"
    assert main(["show", "--l", "3", "--k", "4", "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_trains_on_a_user_jsonl_file_in_pixel_units(tmp_path, capsys):
    """Raw pixel coordinates are normalised, so a model learns from a user's file."""
    ds = data.synthetic_strokes(3, 12, seed=2)
    lines = [json.dumps({"label": int(lab), "strokes": [(s * 500 + 100).tolist() for s in smp]})
             for smp, lab in zip(ds.samples, ds.labels)]
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(lines))
    out = tmp_path / "m.npz"
    assert main(["train", "--data", str(f), "--l", "3", "--k", "8", "--epochs", "3",
                 "--repeats", "2", "--quiet", "--out", str(out), "--batch-size", "8"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--data", "synthetic", "--classes", "2",
                 "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsecnn train: error: GPU backend not available")
    assert "pip install" in err and err.count("\n") == 1
    assert main(["evaluate", str(tmp_path / "missing.npz"), "--quiet"]) == 2
    assert "missing.npz" in capsys.readouterr().err


# -- too little data, empty inputs, tta ---------------------------------------------------------
def test_fit_refuses_empty_or_unfitting_data_before_training(strokes):
    train, test = strokes
    empty = train.subset([])
    model = _model()
    before = _weights(model)
    with pytest.raises(ValueError, match="train_data is empty"):
        T.fit(model, empty, test, epochs=1, **FAST)
    with pytest.raises(ValueError, match="test_data is empty"):
        T.fit(model, train, empty, epochs=1, **FAST)
    wide = data.synthetic_strokes(7, 2, seed=0)      # 7 classes for a 6-class model
    with pytest.raises(ValueError, match="labels up to 6, but the model has 6 classes"):
        T.fit(model, wide, epochs=1, **FAST)
    renamed = data.StrokeDataset(test.samples, test.labels, [f"x{i}" for i in range(6)])
    with pytest.raises(ValueError, match="test_data has 6 classes that the model does not "
                                         "know: 'x0', 'x1'"):
        T.fit(model, train, renamed, epochs=1, **FAST)
    for a, b in zip(before, _weights(model)):   # refused before the first step
        np.testing.assert_array_equal(a, b)


def test_predict_on_no_samples_gives_no_rows():
    p = T.predict(_model(), [])
    assert p.shape == (0, 6) and p.dtype == np.float32


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-1, ValueError), (True, TypeError),
                                      (1.5, TypeError)])
def test_tta_must_be_a_positive_int(strokes, bad, err):
    train, test = strokes
    with pytest.raises(err, match="tta"):
        T.evaluate(_model(), test, tta=bad)
    with pytest.raises(err, match="tta"):
        T.predict(_model(), test.samples[:2], tta=bad)
    with pytest.raises(ValueError, match="tta"):   # FitConfig says ValueError for all
        T.fit(_model(), train, epochs=1, tta=bad, **FAST)


# -- evaluation matches classes by name ---------------------------------------------------------
def test_evaluate_maps_labels_by_class_name(strokes):
    _, test = strokes
    model = _model()
    names = list(test.class_names)
    ref = T.evaluate(model, test, class_names=names)
    assert ref == T.evaluate(model, test)   # same names: labels are the indices
    # the same drawings and classes, the names listed in another order
    perm = np.array([3, 0, 5, 1, 4, 2])
    shuffled = data.StrokeDataset(test.samples, perm[test.labels], [names[i] for i in
                                                                    np.argsort(perm)])
    assert shuffled.class_names != names
    assert T.evaluate(model, shuffled, class_names=names) == ref
    # what scoring by index gives on the reordered data: something else
    assert T.evaluate(model, shuffled)["loss"] != pytest.approx(ref["loss"])
    # a subset of the model's classes, named
    sub = data.StrokeDataset(test.samples[:8], [0] * 8, [names[test.labels[0]], "unused"])
    assert T.evaluate(model, sub, class_names=names)["n"] == 8


def test_evaluate_refuses_classes_the_model_does_not_know(strokes):
    _, test = strokes
    names = list(test.class_names)
    other = data.StrokeDataset(test.samples, test.labels, names[:4] + ["cat", "dog"])
    with pytest.raises(ValueError, match=r"data has 2 classes that the model does not know: "
                                         r"'cat', 'dog'; the model's 6 classes are 'class_0'"):
        T.evaluate(_model(), other, class_names=names)
    with pytest.raises(ValueError, match="class_names has 5 names, but the model has 6"):
        T.evaluate(_model(), test, class_names=names[:5])


# -- what the terminal shows while training -----------------------------------------------------
def test_fit_prints_one_readable_line_per_epoch(strokes, tmp_path, capsys):
    train, test = strokes
    log = tmp_path / "log.jsonl"
    T.fit(_model(), train, test, epochs=2, eval_every=2, log=log, batch_size=16, lr=0.02,
          progress=True, extra_eval={"again": test})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out
    assert re.fullmatch(r"epoch 1/2  loss \d\.\d{4}  accuracy \d+\.\d\d%  \d+ samples/s  lr \S+",
                        out[0]), out[0]
    assert re.fullmatch(r"epoch 2/2  loss \d\.\d{4}  accuracy \d+\.\d\d%  held-out \d+\.\d\d% "
                        r"\(top-5 \d+\.\d\d%\)  again \d+\.\d\d%  \d+ samples/s  lr \S+",
                        out[1]), out[1]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "test_accuracy" in rows[1]
