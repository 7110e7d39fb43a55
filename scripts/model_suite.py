"""fxq's defaults for each bit width, measured on every model of the suite (scripts.models.SUITE).

    python -m scripts.model_suite          # run what is not cached, write the tables into
                                           # docs/low_bits.md and README.md, print them
    python -m scripts.model_suite table    # print the tables from the cache only

Each model is quantized with ``fxq.QConfig(weight_bits=w, act_bits=a)`` — the defaults for the
width, nothing else set — calibrated on 512 training images, and scored on its full test set;
also with each of ``ALTERNATIVES`` at its widths (what the defaults were chosen against).
Results are cached in results/model_suite.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from scripts import data, models, readme
from scripts.sweeps import RESULTS, Cache, key_of
from scripts.train import accuracy

WIDTHS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
# The alternatives the defaults were chosen against: name → (QConfig fields, the widths they are measured at).
ALTERNATIVES = {
    "input, first and last layer at the width too": ({"keep_first_last_8bit": False}, ("W6A6", "W4A8", "W4A4")),
    "fxq's fixed-point requantization": ({"requantize": "fixed_point"}, tuple(WIDTHS)),
}
CACHE = RESULTS / "model_suite.json"
ROOT = Path(__file__).resolve().parent.parent


def _config(setting: str, alternative: str | None) -> fxq.QConfig:
    weight_bits, act_bits = WIDTHS[setting]
    fields = ALTERNATIVES[alternative][0] if alternative else {}
    return fxq.QConfig(weight_bits=weight_bits, act_bits=act_bits, **fields)


def _key(name: str, setting: str, alternative: str | None = None) -> dict:
    # the config names the run: an alternative that is another release's default shares its runs
    return key_of(_config(setting, alternative), model=name, setting=setting)


def measure(cache: Cache, name: str, setting: str, alternative: str | None = None) -> dict:
    key = _key(name, setting, alternative)
    found = cache.get(key)
    if found is not None:
        return found
    recipe = models.SUITE[name]
    model = models.load_trained(name)
    test = data.load(recipe.dataset, "test")
    config = _config(setting, alternative)
    start = time.perf_counter()
    qmodel = fxq.quantize(model, data.calibration_batches(recipe.dataset, 512), config)
    seconds = time.perf_counter() - start
    result = {"float": accuracy(model, test), "quantized": accuracy(qmodel, test),
              "quantize_s": round(seconds, 1)}
    print(name, setting, alternative or "defaults", result, flush=True)
    return cache.add(key, result)


def run() -> None:
    torch.set_num_threads(2)
    cache = Cache(CACHE)
    wanted = [(name, setting, None) for setting in WIDTHS for name in models.SUITE]
    wanted += [(name, setting, alternative) for alternative, (_, widths) in ALTERNATIVES.items()
               for setting in widths for name in models.SUITE]
    for name, setting, alternative in wanted:
        measure(cache, name, setting, alternative)
    cache.retain([_key(*run) for run in wanted])


def _change(record: dict) -> float:
    return record["quantized"] - record["float"]


def tables() -> str:
    """Each model's accuracy against float and their mean and worst per width, from the cache."""
    cache = Cache(CACHE)
    names = list(models.SUITE)
    rows, summary = [], []
    for setting in WIDTHS:
        for alternative in (None, *ALTERNATIVES):
            if alternative and setting not in ALTERNATIVES[alternative][1]:
                continue
            records = [cache.get(_key(n, setting, alternative)) for n in names]
            changes = [_change(r) for r in records if r]
            if not changes:
                continue
            label = f"{setting}, {alternative}" if alternative else setting
            rows.append([label] + [f"{_change(r):+.2f}" if r else "not run yet" for r in records])
            summary.append([label, f"{statistics.mean(changes):+.2f}", f"{min(changes):+.2f}",
                            f"{len(changes)} of {len(names)}"])
    floats = [cache.get(_key(n, "W8A8")) for n in names]
    header = ["vs float (points), full test set"] + [
        f"{n} ({r['float']:.2f})" if r else n for n, r in zip(names, floats)]
    return ("Per model (float accuracy in brackets; negative = accuracy lost):\n\n"
            + tabulate(rows, headers=header, tablefmt="github", disable_numparse=True) + "\n\nOver the suite:\n\n"
            + tabulate(summary, headers=["fxq.QConfig(weight_bits=w, act_bits=a)", "mean vs float", "worst", "models"],
                       tablefmt="github", disable_numparse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=("all", "table"), default="all")
    args = parser.parse_args()
    if args.what == "all":
        run()
    text = tables()
    if args.what == "all":
        for path in (ROOT / "docs" / "low_bits.md", ROOT / "README.md"):
            readme.write("model-suite", text, path)
    print(text)


if __name__ == "__main__":
    main()
