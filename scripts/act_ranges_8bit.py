"""The 8-bit activation range default, measured on every trained model (scripts.models.RECIPES:
five ResNet-18s and three networks of other shapes): min-max against MSE-optimal clipping at W8A8,
everything else at its default, calibrated on 512 training images, scored on the full test set.

    python -m scripts.act_ranges_8bit     # run what is not cached, write docs/low_bits.md's table

Cached in results/act_ranges_8bit.json. The same choice on timm's CNNs (SQNR against torch.ao)
is the zoo's: ``python -m scripts.zoo --timm``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from scripts import data, models, readme
from scripts.sweeps import RESULTS, Cache
from scripts.train import accuracy

RANGES = ("minmax", "mse")
DOC = Path(__file__).resolve().parent.parent / "docs" / "low_bits.md"


def measure(cache: Cache, name: str, act_range: str) -> dict:
    key = {"model": name, "act_range": act_range}
    found = cache.get(key)
    if found is not None:
        return found
    recipe = models.RECIPES[name]
    model, test = models.load_trained(name), data.load(recipe.dataset, "test")
    start = time.perf_counter()
    qmodel = fxq.quantize(model, data.calibration_batches(recipe.dataset, 512), fxq.QConfig(act_range=act_range))
    seconds = time.perf_counter() - start
    result = {"float": accuracy(model, test), "quantized": accuracy(qmodel, test), "quantize_s": round(seconds, 1)}
    print(name, act_range, result, flush=True)
    return cache.add(key, result)


def table(cache: Cache) -> str:
    rows, changes = [], {r: [] for r in RANGES}
    for name in models.RECIPES:
        found = [cache.get({"model": name, "act_range": r}) for r in RANGES]
        if None in found:
            continue
        row = [name, f"{found[0]['float']:.2f}"]
        for r, record in zip(RANGES, found):
            changes[r].append(record["quantized"] - record["float"])
            row += [f"{record['quantized']:.2f}", f"{changes[r][-1]:+.2f}"]
        rows.append(row)
    rows.append(["mean / worst", ""] + [cell for r in RANGES for cell in
                                         ("", f"{statistics.mean(changes[r]):+.3f} / {min(changes[r]):+.2f}")])
    headers = ["model", "float %"] + [h for r in RANGES for h in (f"{r} %", f"{r} vs float")]
    return tabulate(rows, headers=headers, tablefmt="github")


def main() -> None:
    torch.set_num_threads(2)
    cache = Cache(RESULTS / "act_ranges_8bit.json")
    for name in models.RECIPES:
        for act_range in RANGES:
            measure(cache, name, act_range)
    text = table(cache)
    readme.write("act-ranges-8bit", text, DOC)
    print(text)


if __name__ == "__main__":
    main()
