"""fxq.save / fxq.load: integers and graph as data, packed narrow weights, identical outputs."""
import io
import zipfile

import pytest
import torch
from torch import nn

import fxq
from fxq.files import serialize, tensor_blob
from fxq.graphs import records
from fxq.integers import packing
from fxq.ops.layers import QLayer
from tests.helpers import Chain, Residual, randomize_bn


def _calib():
    torch.manual_seed(0)
    return [torch.randn(4, 3, 8, 8) for _ in range(2)]


@pytest.mark.parametrize("config, overrides", [
    (fxq.QConfig(), None),
    (fxq.QConfig(weight_bits=4, act_bits=4, placement="both"), None),
    (fxq.QConfig(weight_bits=3, placement="post"), {"conv2": None}),  # a layer kept in float
])
def test_loaded_model_gives_bit_identical_outputs(tmp_path, config, overrides):
    qmodel = fxq.quantize(randomize_bn(Residual()), _calib(), config, overrides=overrides)
    fxq.save(qmodel, tmp_path / "m.fxq")
    loaded = fxq.load(tmp_path / "m.fxq")
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(qmodel(x), loaded(x))
    assert loaded.code == qmodel.code
    assert records.get(loaded, fxq.QConfig) == config


def test_file_is_plain_data_readable_without_unpickling_code(tmp_path):
    fxq.save(fxq.quantize(randomize_bn(Residual()), _calib()), tmp_path / "m.fxq")
    payload = torch.load(tmp_path / "m.fxq", weights_only=True)  # refuses arbitrary objects
    assert payload["format"] == "fxq/8" and type(payload["modules"]["conv2"]["tensors"]["weight"]) is int
    tensors = tensor_blob.with_tensors(payload)["modules"]["conv2"]["tensors"]
    assert tensors["weight"].dtype == torch.int8 and tensors["bias"].dtype == torch.int32


def test_every_tensor_is_in_one_compressed_entry_of_the_file(tmp_path):
    """A zip entry per tensor cost ~200 bytes each: a third of a small model's file."""
    qmodel = fxq.quantize(randomize_bn(Residual()), _calib())
    fxq.save(qmodel, tmp_path / "m.fxq")
    with zipfile.ZipFile(tmp_path / "m.fxq") as archive:
        data = [info for info in archive.infolist() if "/data/" in info.filename]
    assert len(data) == 1
    raw = sum(t.numel() * t.element_size() for t in qmodel.state_dict().values())
    assert data[0].file_size < raw


def test_narrow_weights_are_packed_and_the_file_shrinks_with_the_width(tmp_path):
    model = Chain().eval()
    calib = [torch.randn(4, 3, 16, 16)]
    sizes = {}
    for bits in (8, 4, 2):
        config = fxq.QConfig(weight_bits=bits, weight_range="minmax", keep_first_last_8bit=False)
        qmodel = fxq.quantize(model, calib, config)
        fxq.save(qmodel, tmp_path / f"w{bits}.fxq")
        payload = tensor_blob.with_tensors(torch.load(tmp_path / f"w{bits}.fxq", weights_only=True))
        sizes[bits] = sum(r["packed"]["weight"]["data"].numel() if r["packed"] else r["tensors"]["weight"].numel()
                          for r in payload["modules"].values() if "weight" in r["packed"] or "weight" in r["tensors"])
        layers = [m for m in fxq.load(tmp_path / f"w{bits}.fxq").modules() if isinstance(m, QLayer)]
        assert all(m.weight.abs().max() <= 2 ** (bits - 1) - 1 for m in layers)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert sizes[8] == weights
    assert sizes[4] <= weights // 2 + 3 and sizes[2] <= weights // 4 + 3


@pytest.mark.parametrize("bits", range(2, 9))
def test_unpacking_is_lossless_at_every_width(bits):
    top = 2 ** (bits - 1) - 1
    values = torch.randint(-top, top + 1, (37, 5, 3), dtype=torch.int8)
    packed = packing.pack(values, bits)
    assert packed.numel() == (values.numel() * bits + 7) // 8
    assert torch.equal(packing.unpack(packed, bits, values.shape, torch.int8), values)


def test_packing_refuses_values_outside_the_width():
    with pytest.raises(ValueError, match="4-bit"):
        packing.pack(torch.tensor([8]), 4)


def test_other_files_and_models_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an fxq model file"):
        fxq.load(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="GraphModule"):
        fxq.save(Chain(), tmp_path / "m.fxq")


def test_a_loaded_model_can_be_explained_and_simulated(tmp_path):
    qmodel = fxq.quantize(randomize_bn(Residual()), _calib(), fxq.QConfig(weight_bits=4))
    fxq.save(qmodel, tmp_path / "m.fxq")
    loaded = fxq.load(tmp_path / "m.fxq")
    x = torch.randn(3, 3, 8, 8)
    assert fxq.explain(loaded, "conv2", x).check.mismatches == 0
    assert "4-bit" in str(fxq.explain(loaded, "conv2"))
    assert (fxq.simulate(loaded)(x) - loaded(x)).abs().max() < 1e-4 * loaded(x).abs().max()


@pytest.fixture
def saved(tmp_path):
    """A saved residual model with every kind of op, and the path of its file."""
    qmodel = fxq.quantize(randomize_bn(Residual()), _calib(), fxq.QConfig(weight_bits=4, placement="both"))
    fxq.save(qmodel, tmp_path / "m.fxq")
    return qmodel, tmp_path / "m.fxq"


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes", "one byte flipped"])
def test_damaged_files_get_fxqs_own_error_and_no_unsafe_advice(saved, damage):
    _, path = saved
    data = path.read_bytes()
    broken = {"empty": b"", "truncated": data[: len(data) // 2],
              "random bytes": bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()),
              "one byte flipped": _flip_a_tensor_byte(data)}[damage]
    path.write_bytes(broken)
    with pytest.raises(fxq.InvalidModelFile, match="not a valid fxq model file|is damaged") as error:
        fxq.load(path)
    assert "weights_only" not in str(error.value)


def _flip_a_tensor_byte(data: bytes) -> bytes:
    """Change one byte in the middle of the compressed tensors inside the zip."""
    blob = torch.load(io.BytesIO(data), weights_only=True)["tensors"]["blob"].numpy().tobytes()
    at = data.find(blob) + len(blob) // 2
    assert len(blob) > 64 and at > len(blob) // 2
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def test_files_of_another_kind_are_refused_by_name(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(fxq.InvalidModelFile, match="not an fxq model file"):
        fxq.load(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        fxq.load(tmp_path / "missing.fxq")


def _rewrite(path, edit):
    """Edit the payload as a crafted file would, and give it a matching digest."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    payload["sha256"] = serialize.digest(payload)
    torch.save(payload, path)


INJECTION = "__import__('pathlib').Path(r'{marker}').touch()"


def _node(payload, op):
    return next(record for record in payload["graph"] if record["op"] == op)


CRAFTED = {
    "node name": lambda p, code: _node(p, "call_module").update(name=f"x; {code}; y"),
    "placeholder target": lambda p, code: _node(p, "placeholder").update(target=f"x=({code})"),
    "method target": lambda p, code: _node(p, "call_module").update(op="call_method", target=f"size(); {code}; x.size"),
    "module target": lambda p, code: _node(p, "call_module").update(target=f"conv2({code})"),
    "function target": lambda p, code: _node(p, "call_module").update(op="call_function", target="builtins.exec",
                                                                       args=(code,)),
    "keyword name": lambda p, code: _node(p, "call_module").update(kwargs={"dict": {f"a=({code}), b": 1}}),
    "module path": lambda p, code: p["modules"].update({f"x({code})": p["modules"]["conv2"]}),
    "class name": lambda p, code: p.update(class_name=f"M({code})"),
    "module type": lambda p, code: p["modules"]["conv2"].update(type="builtins.exec"),
    "attribute name": lambda p, code: p["modules"]["conv2"]["attributes"].update(forward=code),
    "getattr name": lambda p, code: _node(p, "call_module").update(op="call_function", target="builtins.getattr",
                                                                    args=({"node": "x"}, "__class__")),
}


@pytest.mark.parametrize("field", sorted(CRAFTED))
def test_crafted_files_never_run_code(saved, tmp_path, field):
    _, path = saved
    marker = tmp_path / "ran"
    _rewrite(path, lambda payload: CRAFTED[field](payload, INJECTION.format(marker=marker)))
    with pytest.raises(fxq.InvalidModelFile):
        fxq.load(path)
    assert not marker.exists()


def test_a_file_with_a_stale_digest_is_damaged(saved):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["blob"][len(payload["tensors"]["blob"]) // 2] ^= 1
    torch.save(payload, path)
    with pytest.raises(fxq.InvalidModelFile, match="does not match its SHA-256"):
        fxq.load(path)


def test_the_digest_of_a_payload_is_the_one_files_were_written_with():
    """The digest is the file format's: a payload hashes as every earlier version hashed it (known answer)."""
    payload = {"format": "x", "graph": [{"name": "a", "args": ({"node": "b"}, 3, 2.5, None, True), "q": [0.1, 7, 8]}],
               "modules": {"m": {"w": torch.arange(6, dtype=torch.int8).reshape(2, 3), "k": (1, 2)}}, "n": [[], {}, ()]}
    assert serialize.digest(payload) == "f1d965b98cf04a2804f896829c7535dc73ef422aac819a357dfe0e8c0214ef2a"
    payload["graph"][0]["q"][1] = 6
    assert serialize.digest(payload) != "f1d965b98cf04a2804f896829c7535dc73ef422aac819a357dfe0e8c0214ef2a"


def test_models_with_sequential_children_round_trip(tmp_path):
    """Module paths like ``features.0.1`` (torchvision's Sequentials) are saved and loaded."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Sequential(nn.Conv2d(4, 2, 1)),
                          nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    qmodel = fxq.quantize(model, _calib())
    fxq.save(qmodel, tmp_path / "m.fxq")
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(fxq.load(tmp_path / "m.fxq")(x), qmodel(x))


@pytest.mark.parametrize("path", ["a..b", "a.-1", 'a."b', "a b", "a\\b", "", "a.import", "x.(y)", "a" * 101])
def test_module_paths_hold_only_names_torch_fx_writes_safely(path):
    assert not serialize._is_path(path)


@pytest.mark.parametrize("path", ["features.0.1", "block1-0", "layer.2_dequantize", "a.1e3"])
def test_module_paths_may_be_sequential_indices_and_torchvision_names(path):
    assert serialize._is_path(path)
