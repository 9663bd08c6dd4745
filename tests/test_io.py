"""Model files: ``scn.save`` / ``scn.load`` (one .npz, a JSON spec, no pickle) and
``state_dict`` / ``load_state_dict``. A corrupt or hostile file gives a ValueError naming the
path, never code execution."""
import gc
import json
import os
import re
import warnings

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import io as scn_io
from tests.sparse_helpers import random_sparse

FORMAT = "sparsecnn-model-1"


def every_layer_net(dtype=np.float32):
    """A 2-D Sequential with one of every layer type: 11x11 input -> (B, 3) logits."""
    return scn.Sequential(
        scn.SubmanifoldConvolution(2, 4, 3, dtype=dtype, seed=1),   # 11
        scn.Convolution(4, 5, 3, 2, dtype=dtype, seed=2),           # 5
        scn.BatchNorm(5, dtype=dtype, momentum=0.3),
        scn.LeakyReLU(1 / 3),
        scn.MaxPooling(3, 1),                                        # 3
        scn.AveragePooling(2, 1),                                    # 2
        scn.NetworkInNetwork(5, 6, dtype=dtype, seed=3),
        scn.ReLU(),
        scn.Dropout(0.25, seed=4),
        scn.Convolution(6, 4, 2, bias=False, dtype=dtype, seed=5),  # 1
        scn.SparseToDense(),
        scn.Flatten(),
        scn.Linear(4, 3, dtype=dtype, seed=6),
    )


def _perturb(model, rng):
    for p in model.parameters():
        p.data = (p.data + 0.2 * rng.standard_normal(p.shape)).astype(p.dtype)


MODELS = {
    "DeepCNet": (lambda: scn.models.DeepCNet(2, 3, in_channels=2, num_classes=4,
                                             activation="vleaky", seed=3), (12, 12)),
    "DeepCNiN": (lambda: scn.models.DeepCNiN(2, 3, in_channels=2, num_classes=4,
                                             activation=0.2, dropout=0.5, seed=4), (12, 12)),
    "DeepCNet-3d": (lambda: scn.models.DeepCNet(1, 2, in_channels=2, num_classes=3, dim=3,
                                                seed=5), (6, 6, 6)),
    "every-layer": (every_layer_net, (11, 11)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip(name, tmp_path, rng):
    make, spatial = MODELS[name]
    model = make()
    _perturb(model, rng)
    x = random_sparse(rng, 3, spatial, 2, 0.2, np.float32, ground=False, requires_grad=False)
    # move the BatchNorm running statistics away from (0, 1)
    model.train()
    for _ in range(3):
        model(random_sparse(rng, 3, spatial, 2, 0.3, np.float32, ground=False,
                            requires_grad=False))
    model.eval()
    expected = model(x).numpy()
    path = tmp_path / f"{name}.npz"
    scn.save(model, path)
    assert sorted(os.listdir(tmp_path)) == [f"{name}.npz"]      # no temporary left behind
    loaded = scn.load(path)
    assert type(loaded) is type(model)
    assert loaded.spec() == model.spec()
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
        assert b[k].dtype == a[k].dtype, k
    loaded.eval()
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    # the parameters are independent copies
    loaded.parameters()[0].data[...] = 0
    np.testing.assert_array_equal(model(x).numpy(), expected)


def test_batchnorm_running_stats_are_saved(tmp_path, rng):
    model = every_layer_net()
    model.train()
    model(random_sparse(rng, 2, (11, 11), 2, 0.5, np.float32, ground=False,
                        requires_grad=False))
    bn = model[2]
    assert not np.allclose(bn.running_mean, 0) and not np.allclose(bn.running_var, 1)
    scn.save(model, tmp_path / "m.npz")
    bn2 = scn.load(tmp_path / "m.npz")[2]
    np.testing.assert_array_equal(bn2.running_mean, bn.running_mean)
    np.testing.assert_array_equal(bn2.running_var, bn.running_var)
    assert (bn2.eps, bn2.momentum) == (bn.eps, bn.momentum)


def test_file_is_plain_npz(tmp_path):
    model = every_layer_net()
    path = tmp_path / "m.npz"
    scn.save(model, path)
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        arrays = {k: z[k] for k in z.files}
    assert "__spec__" in files
    assert {k for k in files if k.startswith("param:")} == \
        {f"param:{k}" for k in model.state_dict()}
    assert all(a.dtype != object for a in arrays.values())
    doc = json.loads(bytes(arrays["__spec__"]).decode())
    assert doc["format"] == FORMAT
    assert doc["model"] == model.spec()
    assert doc["model"]["layers"][0]["type"] == "SubmanifoldConvolution"


def test_extra_and_meta_round_trip(tmp_path):
    model = scn.models.DeepCNet(1, 2)
    path = tmp_path / "ckpt"            # no .npz suffix: written where asked
    mom = np.arange(6, dtype=np.float32).reshape(2, 3)
    scn_io.save(model, path, extra={"momentum.0": mom}, meta={"epoch": 3, "lr": 0.01})
    assert path.exists() and not (tmp_path / "ckpt.npz").exists()
    loaded, extra, meta = scn_io.load_file(path)
    np.testing.assert_array_equal(extra["momentum.0"], mom)
    assert meta == {"epoch": 3, "lr": 0.01}
    assert isinstance(loaded, scn.models.DeepCNet)


def test_save_overwrites(tmp_path):
    path = tmp_path / "m.npz"
    scn.save(scn.models.DeepCNet(1, 2, seed=1), path)
    m2 = scn.models.DeepCNet(1, 3, seed=2)
    scn.save(m2, path)
    assert scn.load(path).k == 3


def test_save_rejects_non_module(tmp_path):
    with pytest.raises(TypeError, match=r"model must be a sparsecnn Module, got dict"):
        scn.save({"weight": np.ones(3)}, tmp_path / "m.npz")


def test_float64_model_round_trip(tmp_path, rng):
    model = scn.models.DeepCNet(1, 2, dtype=np.float64)
    x = random_sparse(rng, 2, (6, 6), 1, 0.3, np.float64, ground=False, requires_grad=False)
    scn.save(model, tmp_path / "m.npz")
    loaded = scn.load(tmp_path / "m.npz")
    assert all(p.dtype == np.float64 for p in loaded.parameters())
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


# --------------------------------------------------------------------------------------------
# corrupt and hostile files


def _write(path, doc=None, arrays=None, raw_spec=None):
    arrays = dict(arrays or {})
    if raw_spec is None:
        raw_spec = json.dumps(doc).encode()
    arrays["__spec__"] = np.frombuffer(raw_spec, dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _params(model):
    return {f"param:{k}": v for k, v in model.state_dict().items()}


def _load_fails(path, match=None):
    pat = re.escape(str(path))
    if match:
        pat += ".*" + match
    with pytest.raises(ValueError, match=pat):
        scn.load(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.npz"
    scn.save(scn.models.DeepCNet(2, 4), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 30, len(data) - 10):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        _load_fails(bad)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04", b"\x93NUMPY garbage",
                                     b"\x80\x04\x95 pickled"], ids=["empty", "zip-magic",
                                                                    "npy-magic", "pickle"])
def test_garbage_files(tmp_path, content, rng):
    path = tmp_path / "m.npz"
    path.write_bytes(content + rng.bytes(200))
    _load_fails(path)


def test_corrupt_zip_closes_the_file(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"PK\x03\x04" + b"x" * 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=re.escape(str(path))):
            scn.load(path)
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, str(leaks[0].message)


def test_npy_instead_of_npz(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.ones(3))
    _load_fails(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        scn.load(tmp_path / "nope.npz")


def test_no_spec_inside(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, **_params(scn.models.DeepCNet(1, 2)))
    _load_fails(path, "no model spec")


def test_spec_not_json(tmp_path, rng):
    path = tmp_path / "m.npz"
    _write(path, raw_spec=b"{not json" + rng.bytes(20))
    _load_fails(path)


def test_pickled_object_array_is_not_unpickled(tmp_path):
    path = tmp_path / "m.npz"
    marker = tmp_path / "pwned"
    doc = {"format": FORMAT, "model": scn.models.DeepCNet(1, 2).spec(), "meta": {}}
    obj = np.empty(1, dtype=object)
    obj[0] = _Evil(str(marker))
    np.savez(path, __spec__=np.frombuffer(json.dumps(doc).encode(), np.uint8),
             **{"param:features.0.weight": obj})
    _load_fails(path)
    assert not marker.exists()


class _Evil:
    """Unpickling this would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _doc(model_spec, fmt=FORMAT):
    return {"format": fmt, "model": model_spec, "meta": {}}


@pytest.mark.parametrize("spec,match", [
    ({"type": "Transformer", "d_model": 8}, r"unknown layer type 'Transformer'"),
    ({"type": "os.system", "command": "touch {marker}"}, r"unknown layer type 'os.system'"),
    ({"type": "builtins.eval", "source": "open('{marker}', 'w')"}, r"unknown layer type"),
    ({"type": "__import__", "name": "os"}, r"unknown layer type"),
    ({"type": "Sequential", "layers": [{"type": "ReLU"},
                                       {"type": "subprocess.Popen", "args": "touch {marker}"}]},
     r"unknown layer type 'subprocess.Popen'"),
    ({"type": "ReLU", "inner": {"type": "os.system", "command": "touch {marker}"}},
     r"bad argument inner"),
    ({"type": "ReLU", "__class__": "os.system"}, r"ReLU\(\) takes no arguments|__class__"),
    ({"type": "Convolution", "in_channels": 1, "out_channels": 2, "filter_size": [3]},
     r"bad argument filter_size"),
    ({"type": "Convolution", "in_channels": -1, "out_channels": 2, "filter_size": 3},
     r"in_channels must be >= 1"),
    ({"type": "Sequential", "layers": "ReLU"}, r"Sequential spec needs a list"),
    ({"layers": []}, r"a module spec must be a dict with a 'type'"),
    ("os.system", r"a module spec must be a dict"),
    ({"type": ["os", "system"]}, r"a module spec must be a dict with a 'type'"),
], ids=["unknown", "os.system", "eval", "__import__", "nested-Popen", "dict-arg",
        "dunder-kwarg", "list-arg", "bad-value", "layers-not-list", "no-type", "string-spec",
        "type-not-str"])
def test_hostile_spec(spec, match, tmp_path):
    marker = tmp_path / "pwned"
    text = json.dumps(_doc(spec)).replace("{marker}", str(marker))
    path = tmp_path / "m.npz"
    _write(path, raw_spec=text.encode())
    _load_fails(path, match)
    assert not marker.exists()


@pytest.mark.parametrize("doc,match", [
    (_doc(scn.ReLU().spec(), fmt="pickle-1"), r"not a sparsecnn-model-1 file"),
    ([1, 2, 3], r"not a sparsecnn-model-1 file"),
    ({"format": FORMAT}, r"model"),
], ids=["wrong-format", "list-doc", "no-model"])
def test_bad_document(doc, match, tmp_path):
    path = tmp_path / "m.npz"
    _write(path, doc)
    _load_fails(path, match)


def test_deeply_nested_spec(tmp_path):
    depth = 3000
    text = (f'{{"format": "{FORMAT}", "meta": {{}}, "model": '
            + '{"type": "Sequential", "layers": [' * depth + '{"type": "ReLU"}'
            + ']}' * depth + '}')
    path = tmp_path / "m.npz"
    _write(path, raw_spec=text.encode())
    _load_fails(path)


def _saved_state_file(tmp_path, edit):
    model = scn.models.DeepCNet(1, 2)
    arrays = _params(model)
    edit(arrays)
    path = tmp_path / "m.npz"
    _write(path, _doc(model.spec()), arrays)
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.pop("param:features.0.weight"), r"missing \['features.0.weight'\]"),
    (lambda a: a.pop("param:classifier.bias"), r"missing \['classifier.bias'\]"),
    (lambda a: a.update({"param:features.9.weight": np.ones(3, np.float32)}),
     r"unexpected \['features.9.weight'\]"),
    (lambda a: a.update({"param:features.0.weight": np.ones((9, 1, 3), np.float32)}),
     r"state_dict\['features.0.weight'\] has shape \(9, 1, 3\), expected \(9, 1, 2\)"),
    (lambda a: a.update({"param:classifier.bias": np.ones((), np.float32)}),
     r"state_dict\['classifier.bias'\] has shape \(\)"),
    (lambda a: a.update({"param:classifier.bias": np.array(["a"] * 10)}), r"classifier|a"),
], ids=["missing-weight", "missing-bias", "unexpected", "wrong-shape", "scalar", "strings"])
def test_bad_parameters(edit, match, tmp_path):
    _load_fails(_saved_state_file(tmp_path, edit), match)


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip(name, rng):
    make, spatial = MODELS[name]
    a, b = make(), make()
    _perturb(a, rng)
    a.train()
    a(random_sparse(rng, 2, spatial, 2, 0.3, np.float32, ground=False, requires_grad=False))
    a.eval()
    b.eval()
    x = random_sparse(rng, 2, spatial, 2, 0.2, np.float32, ground=False, requires_grad=False)
    assert not np.array_equal(a(x).numpy(), b(x).numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b(x).numpy(), a(x).numpy())


def test_state_dict_is_a_copy_both_ways():
    m = scn.models.DeepCNet(1, 2)
    sd = m.state_dict()
    sd["features.0.weight"][...] = 7
    assert not np.any(m.parameters()[0].data == 7)
    src = {k: v.copy() for k, v in m.state_dict().items()}
    m.load_state_dict(src)
    src["features.0.weight"][...] = 9
    assert not np.any(m.parameters()[0].data == 9)


def test_state_dict_names_in_parameter_order():
    m = every_layer_net()
    names = list(m.state_dict())
    params = [n for n in names if not n.endswith(("running_mean", "running_var"))]
    assert params == [n for n, _ in m.named_parameters()]
    assert "2.running_mean" in names and "2.running_var" in names
    assert "9.bias" not in names        # bias=False


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("classifier.weight"), r"state_dict mismatch: missing "
                                           r"\['classifier.weight'\], unexpected \[\]"),
    (lambda s: s.update(extra=np.ones(2)), r"missing \[\], unexpected \['extra'\]"),
    (lambda s: s.update({"features.3.bias": np.ones(5)}),
     r"state_dict\['features.3.bias'\] has shape \(5,\), expected \(4,\)"),
], ids=["missing", "unexpected", "shape"])
def test_load_state_dict_mismatch(edit, match):
    m = scn.models.DeepCNet(1, 2)
    before = m.state_dict()
    sd = scn.models.DeepCNet(1, 2, seed=9).state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        m.load_state_dict(sd)
    after = m.state_dict()       # a failed load changes nothing
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_load_state_dict_keeps_dtype():
    m = scn.NetworkInNetwork(2, 3)
    m.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(3)})
    assert m.weight.dtype == np.float32 and m.bias.dtype == np.float32
    np.testing.assert_array_equal(m.weight.data, np.ones((2, 3), np.float32))


def test_spec_asking_for_huge_arrays_is_refused_before_allocating(tmp_path):
    """A 50,000 x 50,000 layer (10 GB) with no stored arrays: refused, nothing allocated."""
    path = tmp_path / "m.npz"
    _write(path, _doc({"type": "NetworkInNetwork", "in_channels": 50000,
                       "out_channels": 50000}))
    _load_fails(path, r"more parameters than the file stores")
