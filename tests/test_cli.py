"""The command line: input read as strictly as training data, classes matched by name, one-line
errors (traceback only with --debug / SPARSECNN_DEBUG=1), readable training output."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import data
from sparsecnn.cli import main

ROOT = Path(__file__).parents[1]
NAMES = [f"class_{i}" for i in range(4)]
INFO = {"class_names": NAMES, "features": "presence", "signature_depth": 2, "scale": None}
SAMPLE = [[[0.1, 0.1], [0.9, 0.8]], [[0.5, 0.1], [0.5, 0.9]]]


def _net(**kw):
    return scn.models.DeepCNet(3, 8, num_classes=4, seed=0, **kw)


def _save(path, model=None, info=INFO, **meta):
    scn.save(_net() if model is None else model, path,
             meta={"kind": "model", "info": info, **meta})
    return str(path)


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_one_line_error(rc, err, prog):
    assert rc == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err


@pytest.fixture
def model_file(tmp_path):
    return _save(tmp_path / "m.npz")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def _jsonl(tmp_path, name, ds):
    p = tmp_path / name
    data.save_strokes(ds, p)
    return str(p)


# -- 1. predict reads strokes as strictly as training data --------------------------------------
@pytest.mark.parametrize("strokes, what", [
    ([[0.1, 0.1], [0.9, 0.8]], "a nesting level is missing"),
    ([SAMPLE], "one nesting level too many"),
    ([[["0.1", "0.2"], [0.9, 0.8]]], "a string and a string"),
    ([[[0.1, 0.2], [True, 0.8]]], "a boolean and a number"),
    ([[[0.1, 0.2, 0.3]]], "of 3 values"),
    ({"points": SAMPLE}, "without 'strokes'"),
    ([], "holds no strokes"),
])
def test_predict_refuses_strokes_it_would_have_to_reshape_or_coerce(tmp_path, capsys,
                                                                    model_file, strokes, what):
    js = _write(tmp_path, "s.json", json.dumps(strokes))
    rc, out, err = _run(capsys, ["predict", model_file, js])
    _assert_one_line_error(rc, err, "sparsecnn predict")
    assert "s.json" in err and what in err, err
    assert out == ""


def test_predict_formats_and_top(tmp_path, capsys, model_file):
    results = []
    for name, doc in [("bare.json", SAMPLE), ("object.json", {"strokes": SAMPLE}),
                      ("list.json", [{"strokes": SAMPLE}, {"strokes": SAMPLE[:1]}])]:
        rc, out, _ = _run(capsys, ["predict", model_file, _write(tmp_path, name, json.dumps(doc)),
                                   "--top", "2"])
        assert rc == 0
        results.append(json.loads(out))
    bare, obj, many = results
    assert bare == obj == many[0]
    assert len(bare) == 2 and {r["class"] for r in bare} <= set(NAMES)
    assert bare[0]["probability"] >= bare[1]["probability"]
    assert len(many) == 2 and len(many[1]) == 2
    # a .jsonl stroke file (labels ignored) gives the same answer
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps({"label": 0, "strokes": SAMPLE}) + "\n")
    rc, out, _ = _run(capsys, ["predict", model_file, lines, "--top", "2"])
    assert rc == 0 and json.loads(out) == bare


# -- 2. evaluate matches the data's classes with the model's by name ----------------------------
def _named(names, per_class=3, seed=4):
    ds = data.synthetic_strokes(len(names), per_class, seed=seed)
    return data.StrokeDataset(ds.samples, ds.labels, names)


def test_evaluate_refuses_data_of_other_classes(tmp_path, capsys, model_file):
    f = _jsonl(tmp_path, "other.jsonl", _named(["class_0", "cat", "dog"]))
    rc, out, err = _run(capsys, ["evaluate", model_file, "--data", f, "--quiet"])
    _assert_one_line_error(rc, err, "sparsecnn evaluate")
    assert "2 classes that the model does not know: 'cat', 'dog'" in err
    assert "'class_0', 'class_1', 'class_2', 'class_3'" in err
    assert out == ""


def test_evaluate_scores_reordered_class_names_by_name(tmp_path, capsys):
    # a model that answers every drawing with the class of its output 2 ("class_2")
    net = _net()
    net.classifier.weight.data[:] = 0
    net.classifier.bias.data[:] = [0, 0, 10, 0]
    model = _save(tmp_path / "m.npz", net)
    names = ["class_2", "class_0"]              # "class_2" is label 0 in this file
    ds = _named(names, per_class=5)
    f = _jsonl(tmp_path, "two.jsonl", ds)
    rc, out, err = _run(capsys, ["evaluate", model, "--data", f, "--quiet"])
    assert rc == 0, err
    # the held-out part has one drawing of each class; by name, half are right (by index: 0%)
    assert re.search(r"test +n=2 +accuracy 50\.00%", out), out


def test_evaluate_kanjivg_loads_the_models_classes(tmp_path, capsys):
    try:
        kana = data.load_kanjivg(3, select="kana")
    except FileNotFoundError:
        pytest.skip("KanjiVG data not installed")
    net = scn.models.DeepCNet(3, 8, num_classes=3, seed=0)
    model = _save(tmp_path / "k.npz", net, info=dict(INFO, class_names=kana.class_names))
    rc, out, err = _run(capsys, ["evaluate", model, "--quiet"])     # --data kanjivg
    assert rc == 0, err
    assert re.search(r"test +n=3 ", out), out
    rc, _, err = _run(capsys, ["evaluate", model, "--quiet", "--select", "first"])
    _assert_one_line_error(rc, err, "sparsecnn evaluate")
    assert "does not know" in err


# -- 3./4. every user error: one line on stderr, exit status 2, no traceback ---------------------
def _cases(tmp_path):
    model = _save(tmp_path / "m.npz")
    good = _write(tmp_path, "s.json", json.dumps(SAMPLE))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(Path(model).read_bytes()[:300])
    strokes_npz = tmp_path / "strokes.npz"
    data.save_strokes(_named(["a"]), strokes_npz)
    seq = _save(tmp_path / "seq.npz", scn.Sequential(scn.Convolution(2, 1, 4, 3)))
    deep3 = _save(tmp_path / "deep3.npz", scn.models.DeepCNet(2, 4, dim=3, seed=0))
    bad_meta = {
        "directions": dict(INFO, features="directions"),
        "names": dict(INFO, class_names=NAMES[:3]),
        "dupnames": dict(INFO, class_names=["a", "a", "b", "c"]),
        "nonstr": dict(INFO, class_names=[0, 1, 2, 3]),
        "scale": dict(INFO, scale=100),
        "depth": dict(INFO, signature_depth="2"),
        "kind": dict(INFO, features="pixels"),
    }
    metas = {k: _save(tmp_path / f"meta_{k}.npz", info=v) for k, v in bad_meta.items()}
    info_list = tmp_path / "info_list.npz"
    scn.save(_net(), info_list, meta={"info": ["not", "a", "dict"]})
    bad_jsonl = _write(tmp_path, "bad.jsonl", '{"label": 0, "strokes": [[[0, 0]]]}\n{oops\n')
    ds = _named(["a", "b"], per_class=3)
    ckpt = tmp_path / "ck.npz"
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    train = ["train", "--data", "synthetic", "--classes", "2", "--l", "3", "--k", "4",
             "--epochs", "1", "--repeats", "1", "--quiet", "--out", tmp_path / "o.npz"]
    return {
        # malformed JSON / JSON lines
        "json": (["predict", model, _write(tmp_path, "b.json", '[[[0, 1], [2, 3]')],
                 "not valid JSON"),
        "json-deep": (["predict", model, _write(tmp_path, "d.json", "[" * 100000)], "JSON"),
        "jsonl": (["train", "--data", bad_jsonl, "--quiet"], "line 2: invalid JSON"),
        "jsonl-strings": (["train", "--quiet", "--data", _write(
            tmp_path, "str.jsonl", '{"label": 0, "strokes": [[["1", "2"]]]}\n')], "line 1"),
        "npz-data": (["train", "--quiet", "--data", _write(tmp_path, "x.npz", "junk")],
                     "corrupt or invalid stroke file"),
        # corrupt model files and metadata that does not fit the network
        "truncated": (["predict", truncated, good], "cannot load a sparsecnn model"),
        "not-a-model": (["predict", strokes_npz, good], "cannot load a sparsecnn model"),
        "sequential": (["predict", seq, good], "holds a Sequential, not the 2-D DeepCNet"),
        "3-d": (["predict", deep3, good], "not the 2-D DeepCNet"),
        "meta-features": (["predict", metas["directions"], good], "give 9 input channels"),
        "meta-names": (["evaluate", metas["names"], "--data", "synthetic", "--quiet"],
                       "3 class_names"),
        "meta-dupnames": (["predict", metas["dupnames"], good], "(3 distinct)"),
        "meta-nonstr": (["predict", metas["nonstr"], good], "not a list of strings"),
        "meta-scale": (["predict", metas["scale"], good], "scale=100"),
        "meta-depth": (["predict", metas["depth"], good], "signature_depth='2'"),
        "meta-kind": (["predict", metas["kind"], good], "features='pixels'"),
        "meta-info": (["predict", info_list, good], "'info' is not a JSON object"),
        "checkpoint": ([*train, "--checkpoint", ckpt, "--resume"], "cannot load"),
        # bad options
        "no-command": ([], "required: command"),
        "unknown-command": (["fly"], "invalid choice: 'fly'"),
        "unknown-option": (["predict", model, good, "--bogus"], "unrecognized arguments"),
        "epochs": (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        "batch": (["train", "--batch-size", "x"], "expected an integer, got 'x'"),
        "lr": (["train", "--lr", "-1"], "argument --lr: must be in (0, inf)"),
        "lr-nan": (["train", "--lr", "nan"], "argument --lr"),
        "dropout": (["train", "--dropout", "1"], "argument --dropout"),
        "arch": (["train", "--arch", "resnet"], "invalid choice: 'resnet'"),
        "activation": (["train", "--activation", "tanh"], "argument --activation"),
        "top": (["predict", model, good, "--top", "0"], "argument --top: must be >= 1"),
        "predict-tta": (["predict", model, good, "--tta", "0"], "argument --tta: must be >= 1"),
        "evaluate-tta": (["evaluate", model, "--tta", "-2"], "argument --tta: must be >= 1"),
        "train-tta": (["train", "--tta", "0"], "argument --tta: must be >= 1"),
        "device": ([*train, "--device", "tpu"], "unknown device 'tpu'"),
        "resume": ([*train, "--resume"], "--resume needs --checkpoint"),
        "out-dir": ([*train[:-1], tmp_path], "is a directory"),
        "out-parent": ([*train[:-1], tmp_path / "no" / "m.npz"], "no such directory"),
        "log-parent": ([*train, "--log", tmp_path / "no" / "log.jsonl"], "no such directory"),
        # missing files
        "model-missing": (["predict", tmp_path / "gone.npz", good], "gone.npz"),
        "strokes-missing": (["predict", model, tmp_path / "gone.json"], "gone.json"),
        "data-missing": (["train", "--data", tmp_path / "gone.jsonl"], "gone.jsonl"),
        "data-suffix": (["train", "--data", tmp_path / "mine.csv"], "must end in .npz or .jsonl"),
        # too little data
        "empty": (["train", "--data", _write(tmp_path, "e.jsonl", ""), "--quiet"],
                  "holds no samples; training needs at least 3 drawings of a class"),
        "one": (["train", "--data", _jsonl(tmp_path, "one.jsonl", ds.subset([0])), "--quiet"],
                "too few samples to hold any out (1 sample of 1 class, at most 1 of one class); "
                "training needs at least 3 drawings"),
        "two-each": (["evaluate", model, "--quiet", "--data",
                      _jsonl(tmp_path, "two.jsonl", ds.subset([0, 1, 3, 4]))],
                     "(4 samples of 2 classes, at most 2 of one class)"),
    }


CASES = [
    "json", "json-deep", "jsonl", "jsonl-strings", "npz-data", "truncated", "not-a-model",
    "sequential", "3-d", "meta-features", "meta-names", "meta-dupnames", "meta-nonstr",
    "meta-scale", "meta-depth", "meta-kind", "meta-info", "checkpoint", "no-command",
    "unknown-command", "unknown-option", "epochs", "batch", "lr", "lr-nan", "dropout", "arch",
    "activation", "top", "predict-tta", "evaluate-tta", "train-tta", "device", "resume",
    "out-dir", "out-parent", "log-parent", "model-missing", "strokes-missing", "data-missing",
    "data-suffix", "empty", "one", "two-each"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("SPARSECNN_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    cases = _cases(tmp_path)
    assert sorted(cases) == sorted(CASES)
    argv, what = cases[case]
    rc, out, err = _run(capsys, argv)
    cmd = [str(a) for a in argv[:1] if str(a) in ("train", "evaluate", "predict")]
    _assert_one_line_error(rc, err, " ".join(["sparsecnn", *cmd]))
    assert what in err, err
    assert not (tmp_path / "o.npz").exists()      # nothing trained, nothing saved


@pytest.mark.parametrize("exc, want", [
    (ValueError("first line\n  second line"), "first line second line"),
    (MemoryError(), "out of memory"),
    (PermissionError(13, "Permission denied", "/x/y.npz"), "Permission denied: /x/y.npz"),
    (FloatingPointError("the loss became nan"), "the loss became nan"),
])
def test_error_messages_are_flattened_to_one_line(capsys, monkeypatch, exc, want):
    from sparsecnn import cli

    def fail(args):
        raise exc
    monkeypatch.delenv("SPARSECNN_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_info", fail)
    rc, _, err = _run(capsys, ["info"])
    _assert_one_line_error(rc, err, "sparsecnn info")
    assert err == f"sparsecnn info: error: {want}\n"


def test_interrupt_is_one_line(capsys, monkeypatch):
    from sparsecnn import cli

    def stop(args):
        raise KeyboardInterrupt
    monkeypatch.delenv("SPARSECNN_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_info", stop)
    rc, _, err = _run(capsys, ["info"])
    assert rc == 130 and err.strip() == "sparsecnn info: interrupted"


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, model_file):
    bad = _write(tmp_path, "b.json", "{")
    monkeypatch.delenv("SPARSECNN_DEBUG", raising=False)
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["--debug", "predict", model_file, bad])
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["predict", model_file, bad, "--debug"])
    monkeypatch.setenv("SPARSECNN_DEBUG", "1")
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["predict", model_file, bad])
    monkeypatch.setenv("SPARSECNN_DEBUG", "0")
    assert main(["predict", model_file, bad]) == 2


def test_python_m_sparsecnn_error_has_no_traceback(tmp_path, model_file):
    bad = _write(tmp_path, "b.json", json.dumps([[0, 0], [1, 1]]))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SPARSECNN_DEBUG", None)
    cmd = [sys.executable, "-m", "sparsecnn", "predict", model_file, bad]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("sparsecnn predict: error: ") and r.stderr.count("\n") == 1
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(env, SPARSECNN_DEBUG="1"))
    assert r.returncode != 0 and "Traceback" in r.stderr


# -- 5. the terminal shows the bar and one summary line per epoch; JSON goes to --log ------------
def test_train_shows_summary_lines_and_logs_json(tmp_path, capsys):
    out, log = tmp_path / "m.npz", tmp_path / "log.jsonl"
    rc, text, err = _run(capsys, ["train", "--data", "synthetic", "--classes", "3", "--l", "3",
                                  "--k", "8", "--epochs", "2", "--repeats", "1",
                                  "--batch-size", "16", "--eval-every", "2", "--out", out,
                                  "--log", log])
    assert rc == 0, err
    lines = text.splitlines()
    assert not [x for x in lines if x.lstrip().startswith("{")], text    # no raw JSON
    epochs = [x for x in lines if x.startswith("epoch ")]
    assert len(epochs) == 2, text
    assert re.match(r"epoch 1/2  loss \d\.\d{4}  accuracy [\d.]+%  \d+ samples/s", epochs[0])
    assert re.match(r"epoch 2/2  loss \d\.\d{4}  accuracy [\d.]+%  held-out [\d.]+% \(top-5 "
                    r"[\d.]+%\)  \d+ samples/s", epochs[1])
    assert "epoch 1/2" in err    # the progress bar (stderr)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "test_accuracy" in rows[1]
    assert "macs_per_sample" in rows[0]
    assert lines[-1] == f"model saved to {out}" and out.exists()


def test_train_user_file_with_enough_data(tmp_path, capsys):
    """Three drawings of one class are enough: two train, one is held out."""
    ds = _named(["a", "b"], per_class=3)
    f = _jsonl(tmp_path, "six.jsonl", ds)
    out = tmp_path / "m.npz"
    rc, text, err = _run(capsys, ["train", "--data", f, "--l", "3", "--k", "4", "--epochs", "1",
                                  "--repeats", "1", "--quiet", "--out", out])
    assert rc == 0, err
    assert "4 training drawings" in text and "2 test drawings" in text and out.exists()
    model, _, meta = scn.io.load_file(out)
    assert meta["info"]["class_names"] == ["a", "b"]
    assert np.isfinite(meta["history"][-1]["test_loss"])
