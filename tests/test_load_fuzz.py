"""Fuzzing fxq.load: every string, number and tensor of a saved file, changed, one at a time —
both as the file holds them (tensors by index into one compressed table: the indices, the specs,
the blob) and as the loader reads them once that table is decoded (each tensor, written again).

Two kinds of change: a damaged file (the content changed, the digest not) must be refused as
damaged; a crafted file (the digest recomputed, as an attacker would) must be refused with fxq's
own error or load into a model that runs — and in no case may anything the file carries execute.
"""
import pytest
import torch

import fxq
from fxq.files import serialize, tensor_blob
from tests.helpers import Residual, randomize_bn

INJECTION = "__import__('pathlib').Path(r'{marker}').touch()"


def _leaves(value, path=()):
    """Every (path, value) of a payload below dicts and lists, dict keys included as ('key', k)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path + (("key", key),), key
            yield from _leaves(item, path + (key,))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, path + (index,))
    else:
        yield path, value


def _mutations(value, marker):
    """Other values of the same field: wrong, hostile and near-miss ones."""
    if isinstance(value, str):
        return [INJECTION.format(marker=marker), "", value + "_x", "conv2", "x"]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, -1, 2**40]
    if isinstance(value, float):
        return [value * 2, float("nan"), -value]
    if value is None:
        return [0, "x"]
    if isinstance(value, torch.Tensor):
        bumped = value.clone()
        if bumped.numel():
            bumped.view(-1)[0] += 1
        return [bumped, value.to(torch.float32 if value.dtype != torch.float32 else torch.int64),
                value.reshape(-1)[:-1] if value.numel() else torch.zeros(1), value.unsqueeze(0)]
    return []


REFUSED = object()


def _changed(payload, path, new):
    """``payload`` with the field at ``path`` set to ``new`` (a dict key renamed for a ('key', k)
    step), copying only the containers on the path; REFUSED where the field cannot take ``new``."""
    if not path:
        return new
    step, rest = path[0], path[1:]
    if isinstance(step, tuple) and step[0] == "key":  # rename a dict key, keeping the order
        if not isinstance(new, (str, int)) or new in payload:
            return REFUSED
        return {new if key == step[1] else key: item for key, item in payload.items()}
    if isinstance(payload, tuple) and not rest:
        return REFUSED  # tuples hold node arguments; their items are covered through lists
    item = _changed(payload[step], rest, new)
    if item is REFUSED:
        return REFUSED
    copy_ = dict(payload) if isinstance(payload, dict) else list(payload)
    copy_[step] = item
    return type(payload)(copy_) if isinstance(payload, tuple) else copy_


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    qmodel = fxq.quantize(randomize_bn(Residual()), calib, fxq.QConfig(weight_bits=4, placement="both"),
                          overrides={"conv2": None})  # a float layer kept between integers
    path = tmp_path_factory.mktemp("fuzz") / "m.fxq"
    fxq.save(qmodel, path)
    return torch.load(path, weights_only=True)


def _kind(payload, path) -> tuple:
    """Which field ``path`` is, whatever layer or node it belongs to: graph fields by their node's
    op, module fields by the module's type, positions in argument lists as '#'."""
    if path[0] == "graph" and len(path) > 1:
        head = ("graph", payload["graph"][path[1]]["op"])
        rest = path[2:]
    elif path[0] == "modules" and len(path) > 1 and not isinstance(path[1], tuple):
        head = ("modules", payload["modules"][path[1]]["type"])
        rest = path[2:]
    else:
        head, rest = (), path
    return head + tuple("#" if isinstance(p, int) else p for p in rest)


def _crafted(saved, marker):
    """``(path, payload)`` for every change, to the file as written and to what it decodes to."""
    for path, new in _cases(saved, marker):
        payload = _changed(saved, path, new)
        if payload is not REFUSED:
            yield path, payload
    decoded = tensor_blob.with_tensors(saved)
    for path, new in _cases(decoded, marker):
        changed = _changed(decoded, path, new)
        if path[0] not in ("modules", "constants") or changed is REFUSED:
            continue
        try:
            yield path, tensor_blob.by_index(changed)
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError):
            continue  # no longer a payload fxq.save could write: the changes to the file cover those


def _cases(payload, marker, per_kind=1):
    """Every kind of field, changed in every way, at up to ``per_kind`` places of the file."""
    seen: dict[tuple, int] = {}
    for path, value in _leaves(payload):
        if path and path[0] == "sha256":
            continue
        kind = _kind(payload, path)
        seen[kind] = seen.get(kind, 0) + 1
        if seen[kind] > per_kind:
            continue
        for new in _mutations(value, marker):
            yield path, new


@pytest.mark.real_data  # the whole sweep of crafted files (~15 s): in make test, out of the unit loop
def test_every_field_changed_in_a_crafted_file_is_refused_or_loads_a_working_model(saved, tmp_path):
    marker = tmp_path / "ran"
    x = torch.randn(3, 3, 8, 8)
    counts = {"refused": 0, "loaded": 0}
    for index, (path, payload) in enumerate(_crafted(saved, marker)):
        payload["sha256"] = serialize.digest(payload)
        try:
            # torch's pickling takes most of the time and is the same for every field: one file in
            # ten goes through it, the rest is built from the payload fxq.load would have read
            if index % 10 == 0:
                torch.save(payload, tmp_path / "crafted.fxq")
                model = fxq.load(tmp_path / "crafted.fxq")
            else:
                model = serialize.build(payload, "crafted.fxq")
        except fxq.InvalidModelFile:
            counts["refused"] += 1
        else:
            counts["loaded"] += 1
            out = model(x)
            assert isinstance(out, torch.Tensor) and out.is_floating_point(), path
        assert not marker.exists(), f"changing {path} ran code from the file"
    assert counts["refused"] > 100 and counts["loaded"] > 20, counts
    assert serialize.digest(saved) == saved["sha256"]  # the crafted files shared its unchanged parts


def test_every_field_changed_without_its_digest_is_a_damaged_file(saved, tmp_path):
    marker = tmp_path / "ran"
    changed = 0
    for index, (path, new) in enumerate(list(_cases(saved, marker))[::4]):  # the digest sees every byte
        payload = _changed(saved, path, new)
        if payload is REFUSED:
            continue
        if serialize.digest(payload) == saved["sha256"]:
            continue  # the change did not change anything (e.g. a value set to itself)
        with pytest.raises(fxq.InvalidModelFile):
            if index % 10 == 0:  # through a file; the rest as fxq.load checks what it read
                torch.save(payload, tmp_path / "damaged.fxq")
                fxq.load(tmp_path / "damaged.fxq")
            else:
                serialize.intact(payload, "damaged.fxq")
        changed += 1
        assert not marker.exists()
    assert changed > 100
