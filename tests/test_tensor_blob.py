"""A saved model's tensors as one compressed string: every dtype and layout comes back equal, a
16-bit lookup table shrinks to a few kB, and a crafted table is refused before anything is made."""
import zlib

import pytest
import torch

from fxq.files import tensor_blob
from fxq.files.saved_graph import InvalidModelFile


def _every_kind():
    torch.manual_seed(0)
    return [torch.randint(-128, 128, (8, 3, 3, 3), dtype=torch.int8),
            torch.randint(0, 256, (5,), dtype=torch.uint8),
            torch.randint(-2**31, 2**31 - 1, (7,), dtype=torch.int32),  # steps too large: raw
            torch.arange(0, 65536, dtype=torch.int32) // 3,  # steps of 0 and 1: as int8 differences
            torch.arange(0, 3000, 2, dtype=torch.int64) * 100,  # steps of 200: as int16 differences
            torch.tensor([-32768, 32767], dtype=torch.int16),
            torch.randn(4, 4), torch.randn(3, dtype=torch.float64), torch.rand(6) > 0.5,
            torch.zeros(0, 3, dtype=torch.int32), torch.tensor(7, dtype=torch.int64)]


def test_every_dtype_and_layout_comes_back_equal():
    tensors = _every_kind()
    entry = tensor_blob.encode(tensors)
    assert [spec[2] for spec in entry["specs"]][2:5] == ["raw", "delta8", "delta16"]
    back = tensor_blob.decode(entry)
    assert all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(tensors, back))


def test_a_16_bit_lookup_table_takes_a_few_kilobytes():
    grid = torch.arange(65536, dtype=torch.float64)
    table = torch.round(65535 * torch.sigmoid((grid - 32768) / 4096)).to(torch.int32)
    assert tensor_blob.encode([table])["blob"].numel() < 4096  # 256 kB as int32


def _entry(specs, raw: bytes):
    return {"specs": specs, "blob": torch.frombuffer(bytearray(zlib.compress(raw)), dtype=torch.uint8)}


@pytest.mark.parametrize("name, entry", [
    ("more bytes than the specs say", _entry([["int8", [4], "raw"]], bytes(4096))),
    ("fewer bytes than the specs say", _entry([["int32", [4], "raw"]], bytes(8))),
    ("a dtype fxq does not save", _entry([["complex64", [1], "raw"]], bytes(8))),
    ("a negative size", _entry([["int8", [-1], "raw"]], b"")),
    ("a size beyond any model", _entry([["int64", [2**39], "raw"]], b"")),
    ("differences of a float", _entry([["float32", [2], "delta8"]], bytes(2))),
    ("differences of a matrix", _entry([["int32", [2, 2], "delta8"]], bytes(4))),
    ("differences that leave the dtype", _entry([["int16", [2], "delta16"]], b"\xff\x7f\xff\x7f")),
    ("a bool that is neither 0 nor 1", _entry([["bool", [1], "raw"]], b"\x02")),
    ("not zlib", {"specs": [["int8", [1], "raw"]], "blob": torch.tensor([1, 2, 3], dtype=torch.uint8)}),
    ("a blob of the wrong dtype", {"specs": [], "blob": torch.zeros(3)}),
    ("a spec that is not a list", _entry(["int8"], b"")),
])
def test_a_crafted_table_is_refused_by_name(name, entry):
    with pytest.raises(InvalidModelFile):
        tensor_blob.decode(entry)


def test_an_index_used_twice_or_a_tensor_left_over_is_refused():
    tensors = [torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)]
    record = {"type": "X", "attributes": {}, "packed": {}}
    twice = {"modules": {"a": {**record, "tensors": {"bias": 0}}, "b": {**record, "tensors": {"bias": 0}}},
             "constants": {}, "tensors": tensor_blob.encode(tensors)}
    with pytest.raises(InvalidModelFile, match="used twice"):
        tensor_blob.with_tensors(twice)
    left_over = {"modules": {"a": {**record, "tensors": {"bias": 0}}}, "constants": {},
                 "tensors": tensor_blob.encode(tensors)}
    with pytest.raises(InvalidModelFile, match="no module or constant uses"):
        tensor_blob.with_tensors(left_over)
