"""Trainer: learns, resumes exactly, is deterministic, guards divergence; CLI smoke tests."""
import json

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import data
from sparsecnn import train as T
from sparsecnn.cli import main

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


def test_fixed_seed_identical_runs(strokes):
    train, _ = strokes
    a, b = _model(), _model()
    T.fit(a, train, epochs=2, **FAST)
    T.fit(b, train, epochs=2, **FAST)
    for x, y in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(x, y)


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


def test_cli_train_predict_evaluate(tmp_path, capsys):
    out = tmp_path / "m.npz"
    assert main(["train", "--data", "synthetic", "--classes", "4", "--l", "3", "--k", "8",
                 "--epochs", "2", "--repeats", "1", "--quiet", "--out", str(out),
                 "--batch-size", "16", "--eval-every", "1"]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and out.exists()
    sample = data.synthetic_strokes(4, 1, seed=5).samples[0]
    js = tmp_path / "s.json"
    js.write_text(json.dumps([s.tolist() for s in sample]))
    assert main(["predict", str(out), str(js)]) == 0
    top = json.loads(capsys.readouterr().out)
    assert len(top) == 4 and abs(sum(t["probability"] for t in top) - 1) < 1e-4
    assert main(["evaluate", str(out), "--data", "synthetic", "--classes", "4",
                 "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_predict_bad_file(tmp_path):
    out = tmp_path / "m.npz"
    scn.save(_model(), out)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[["a", "b"]]]))
    with pytest.raises(SystemExit, match="not a list of strokes"):
        main(["predict", str(out), str(bad)])


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
    assert err.startswith("sparsecnn train: GPU backend not available") and "pip install" in err
    assert main(["evaluate", str(tmp_path / "missing.npz"), "--quiet"]) == 2
    assert "missing.npz" in capsys.readouterr().err
