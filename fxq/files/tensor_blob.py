"""Every tensor of a saved model in one compressed byte string: a list of specs (dtype, shape,
layout) as plain data, and the tensors' bytes one after the other, zlib-compressed.

Why not one torch.save entry per tensor: each is a zip entry of its own (about 200 bytes of
headers and alignment: a third of a small model's file), stored uncompressed, and a 16-bit
activation's lookup table is 65,536 int32 values that mostly differ by a step or two (256 kB,
more than its layer's weights). A one-dim integer tensor whose successive differences fit int8
or int16 is stored as those differences, which compress to almost nothing.

Reading is bounded: the specs say how many bytes the tensors take, the blob is inflated to at
most that many, and every spec, size and value range is checked before a tensor is made
(`decode` raises `fxq.files.saved_graph.InvalidModelFile`).
"""
from __future__ import annotations

import math
import zlib

import torch

from fxq.files.saved_graph import expect

DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
          "int64": torch.int64, "float32": torch.float32, "float64": torch.float64, "bool": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
DELTAS = {"delta8": torch.int8, "delta16": torch.int16}  # layout → the dtype differences are stored in
MAX_DIMS, MAX_BYTES = 8, 2**36
LEVEL = 6


def by_index(payload: dict) -> dict:
    """``payload`` with each tensor replaced by its index in ``payload["tensors"]``, the one
    compressed string of them all."""
    tensors: list[torch.Tensor] = []

    def index(tensor: torch.Tensor) -> int:
        tensors.append(tensor)
        return len(tensors) - 1

    modules = {target: {**record, "tensors": {name: index(t) for name, t in record["tensors"].items()},
                        "packed": {name: {**entry, "data": index(entry["data"])}
                                   for name, entry in record["packed"].items()}}
               for target, record in payload["modules"].items()}
    constants = {target: index(tensor) for target, tensor in payload["constants"].items()}
    return {**payload, "modules": modules, "constants": constants, "tensors": encode(tensors)}


def with_tensors(payload: dict) -> dict:
    """`by_index` undone: each index replaced by its tensor, each tensor used exactly once."""
    tensors = decode(payload["tensors"])
    used: set[int] = set()

    def tensor(index: object) -> torch.Tensor:
        expect(type(index) is int and 0 <= index < len(tensors) and index not in used,
               f"tensor index {index!r} is out of range or used twice")
        used.add(index)
        return tensors[index]

    modules = {}
    for target, record in payload["modules"].items():
        expect(isinstance(record, dict) and isinstance(record.get("tensors"), dict)
               and isinstance(record.get("packed"), dict)
               and all(isinstance(entry, dict) and "data" in entry for entry in record["packed"].values()),
               f"'{target}' is not a module record")
        modules[target] = {**record, "tensors": {name: tensor(i) for name, i in record["tensors"].items()},
                           "packed": {name: {**entry, "data": tensor(entry["data"])}
                                      for name, entry in record["packed"].items()}}
    constants = {target: tensor(index) for target, index in payload["constants"].items()}
    expect(len(used) == len(tensors), "the file holds tensors no module or constant uses")
    return {**payload, "modules": modules, "constants": constants}


def encode(tensors: list[torch.Tensor]) -> dict:
    """``{"specs": [[dtype, shape, layout], ...], "blob": uint8 tensor}`` for ``tensors``."""
    specs, parts = [], []
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype not in NAMES:
            raise ValueError(f"cannot save a {tensor.dtype} tensor: fxq files hold {sorted(DTYPES)}")
        layout, stored = _laid_out(tensor)
        specs.append([NAMES[tensor.dtype], list(tensor.shape), layout])
        parts.append(stored.reshape(-1).view(torch.uint8).numpy().tobytes())
    blob = zlib.compress(b"".join(parts), LEVEL)
    return {"specs": specs, "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else
            torch.zeros(0, dtype=torch.uint8)}


def _laid_out(tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    if tensor.dim() == 1 and tensor.numel() > 1 and tensor.dtype in (torch.int16, torch.int32, torch.int64):
        steps = torch.diff(tensor.to(torch.int64), prepend=tensor.new_zeros(1, dtype=torch.int64))
        for layout, dtype in DELTAS.items():
            info = torch.iinfo(dtype)
            if info.min <= int(steps.min()) and int(steps.max()) <= info.max:
                return layout, steps.to(dtype)
    return "raw", tensor


def decode(entry: object) -> list[torch.Tensor]:
    """The tensors ``encode`` wrote, each checked against its spec."""
    expect(isinstance(entry, dict) and set(entry) == {"specs", "blob"}, "the tensor table is malformed")
    specs, blob = entry["specs"], entry["blob"]
    expect(isinstance(specs, list) and isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8
           and blob.dim() == 1, "the tensor table is malformed")
    laid = [_checked_spec(spec) for spec in specs]
    sizes = [math.prod(shape) * stored.itemsize for _, shape, _, stored in laid]
    expect(sum(sizes) <= MAX_BYTES, "the tensors are larger than any model fxq saves")
    raw = _inflated(blob.numpy().tobytes(), sum(sizes))
    tensors, start = [], 0
    for (dtype, shape, layout, stored), size in zip(laid, sizes):
        tensors.append(_tensor(raw[start:start + size], dtype, shape, layout, stored))
        start += size
    return tensors


def _checked_spec(spec: object) -> tuple[torch.dtype, list[int], str, torch.dtype]:
    expect(isinstance(spec, list) and len(spec) == 3, f"tensor spec {spec!r} is malformed")
    name, shape, layout = spec
    expect(isinstance(name, str) and name in DTYPES, f"tensor dtype {name!r} is not one fxq saves")
    expect(isinstance(shape, list) and len(shape) <= MAX_DIMS
           and all(type(s) is int and 0 <= s < 2**40 for s in shape), f"tensor shape {shape!r} is malformed")
    dtype = DTYPES[name]
    expect(layout == "raw" or layout in DELTAS and len(shape) == 1 and dtype in (torch.int16, torch.int32, torch.int64),
           f"tensor layout {layout!r} does not fit a {name} tensor of shape {shape}")
    return dtype, shape, layout, DELTAS.get(layout, dtype)


def _inflated(data: bytes, size: int) -> bytes:
    """``data`` inflated, if it holds exactly ``size`` bytes (never more are made)."""
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(data, size + 1)
    except zlib.error:
        raw = None
    expect(raw is not None and len(raw) == size and inflate.eof and not inflate.unused_data,
           "the tensor data is damaged or does not match its specs")
    return raw


def _tensor(raw: bytes, dtype: torch.dtype, shape: list[int], layout: str, stored: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.zeros(shape, dtype=dtype)
    read_as = torch.uint8 if stored == torch.bool else stored
    values = torch.frombuffer(bytearray(raw), dtype=read_as).reshape(shape)
    if stored == torch.bool:
        expect(int(values.max()) <= 1, "a bool tensor holds values other than 0 and 1")
        return values.to(torch.bool)
    if layout == "raw":
        return values
    summed = values.to(torch.int64).cumsum(0)
    info = torch.iinfo(dtype)
    expect(info.min <= int(summed.min()) and int(summed.max()) <= info.max,
           f"a {NAMES[dtype]} tensor stored as differences leaves its range")
    return summed.to(dtype)
