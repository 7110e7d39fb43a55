"""What exactness in onnxruntime's fast U8S8 kernels on every CPU costs, on the model suite.

    python -m scripts.pair_safe            # results/pair_safe.json (cached per model) + the table

Without VNNI, onnxruntime's U8S8 kernels add two uint8 × int8 products in a 16-bit lane
(`fxq.deployment.saturation`); a layer is exact there when ``2 · q_max(input) · max|W_q| ≤ 32767``. Two
roads keep U8S8 (the fast kernels) exact: one bit less on the weights (``QConfig(pair_safe=True)``:
7-bit weights beside 8-bit activations) or on the activations (7-bit activations, the network
input included). Each model of the suite (scripts.models.SUITE) is quantized at W8A8 with min-max
ranges both ways and plain (and so are the branched models: MobileNetV2, MobileNetV3, Inception),
calibrated on 512 training images, scored on its full test set.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from scripts import data, models, readme
from scripts.results import Store
from scripts.train import accuracy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "pair_safe.json"
CONFIGS = {
    "W8A8 (default)": {},
    "pair_safe=True (7-bit weights)": {"pair_safe": True},
    "7-bit activations": {"act_bits": 7, "weight_range": "minmax", "act_range": "minmax",
                          "keep_first_last_8bit": False},
}


def measure(name: str) -> dict:
    recipe = models.RECIPES[name]
    model, test = models.load_trained(name), data.load(recipe.dataset, "test")
    calib = data.calibration_batches(recipe.dataset, 512)
    row = {"float": accuracy(model, test)}
    for label, fields in CONFIGS.items():
        row[label] = accuracy(fxq.quantize(model, calib, fxq.QConfig(**fields)), test)
    print(name, row, flush=True)
    return row


def table(results: dict) -> str:
    base = next(iter(CONFIGS))
    rows = [[name, f"{r['float']:.2f}", *(f"{r[c]:.2f} ({r[c] - r[base]:+.2f})" for c in CONFIGS)]
            for name, r in results.items()]
    changes = {c: [r[c] - r[base] for r in results.values()] for c in list(CONFIGS)[1:]}
    rows.append(["mean change (worst)", "", "",
                 *(f"{sum(d) / len(d):+.3f} ({min(d):+.2f})" for d in changes.values())])
    return tabulate(rows, headers=["model", "float %", *CONFIGS], tablefmt="github")


def main() -> None:
    torch.set_num_threads(2)
    store = Store(RESULTS)
    for name in models.RECIPES:
        if name not in store:
            store.put(name, measure(name))
    text = table(store.data)
    readme.publish("pair-safe", text)


if __name__ == "__main__":
    main()
