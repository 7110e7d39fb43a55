"""The size of `fxq.save`'s file against the float model's state dict, at the widths users pick.

    python -m scripts.file_sizes

Every trained model of the repository (`scripts.models.RECIPES`: the ResNet-18 suite, MobileNetV2,
MobileNetV3-small, an inception-style net), quantized with ``fxq.QConfig(weight_bits=w,
act_bits=a)`` on 64 calibration images (sizes do not depend on how many), saved to memory. The
float size is ``torch.save(model.state_dict())``, as `fxq.analysis.measure.saved_bytes` counts it. Writes
``results/file_sizes.json`` and the README's ``file-sizes`` block.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from fxq.analysis.measure import saved_bytes
from scripts import data, models, readme

RESULTS = Path(__file__).resolve().parent.parent / "results" / "file_sizes.json"
WIDTHS = {"W8A8": (8, 8), "W8A16": (8, 16), "W4A8": (4, 8), "W4A4": (4, 4)}


def measure(name: str) -> dict:
    recipe = models.RECIPES[name]
    model = models.load_trained(name)
    calib = data.calibration_batches(recipe.dataset, 64)
    result = {"float_bytes": saved_bytes(model)}
    for label, (weight_bits, act_bits) in WIDTHS.items():
        buffer = io.BytesIO()
        fxq.save(fxq.quantize(model, calib, fxq.QConfig(weight_bits=weight_bits, act_bits=act_bits)), buffer)
        with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
            entries = len(archive.infolist())
        result[label] = {"bytes": buffer.tell(), "zip_entries": entries}
    return result


def table(results: dict) -> str:
    rows = [[name, models.RECIPES[name].architecture, f"{r['float_bytes'] / 1e6:.2f}"]
            + [f"{r[w]['bytes'] / r['float_bytes']:.3f}" for w in WIDTHS] for name, r in results.items()]
    return tabulate(rows, headers=["model", "network", "float MB", *(f"{w} × float" for w in WIDTHS)],
                    tablefmt="github")


def main() -> None:
    torch.set_num_threads(2)
    results = {}
    for name in models.RECIPES:
        results[name] = measure(name)
        print(name, results[name], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python -m scripts.file_sizes", "results": results}, indent=1) + "\n")
    text = table(results)
    readme.write("file-sizes", text)
    print(text)


if __name__ == "__main__":
    main()
