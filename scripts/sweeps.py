"""Accuracy sweeps behind docs/ranges.md, cached as JSON so the page regenerates in minutes.

    python -m scripts.sweeps grid --dataset fashion          # weight method × activation method
    python -m scripts.sweeps calibration --dataset fashion   # calibration-set size and diversity

Sweeps run on a fixed, seeded 2,000-image subset of the test set (the headline numbers in the
README use the full 10k). Results append to ``results/sweep_<kind>_<dataset>.json``; a run that
is already there is not repeated.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

import fxq
from fxq.config import ACT_RANGES, WEIGHT_RANGES
from scripts import data, models
from scripts.results import Store
from scripts.train import accuracy

RESULTS = Path(__file__).resolve().parent.parent / "results"
SUBSET, SUBSET_SEED = 2000, 1234
SETTINGS = {  # the two widths of the grid: 8-bit everything, and the discriminating one
    "W8A8": dict(weight_bits=8, act_bits=8, per_channel=True),
    "W4A8 per-tensor": dict(weight_bits=4, act_bits=8, per_channel=False, keep_first_last_8bit=False),
}
CALIB_SIZES = (1, 8, 32, 128, 512, 2048)
CALIB_SEEDS = (0, 1, 2)


def test_subset(dataset: str) -> data.Split:
    test = data.load(dataset, "test")
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(SUBSET_SEED))[:SUBSET]
    return data.Split(test.images[index], test.labels[index])


def key_of(config: fxq.QConfig, **extra) -> dict:
    """A run's cache key: every field of its config, so a changed default is measured again, not read."""
    return {**{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}, **extra}


class Cache:
    """Results keyed by a run's description, saved after every run."""

    def __init__(self, path: Path):
        self.store = Store(path)
        self.runs = self.store.get("runs", [])

    def get(self, key: dict):
        return next((r for r in self.runs if r["key"] == key), None)

    def add(self, key: dict, result: dict) -> dict:
        record = {"key": key, **result}
        self.runs.append(record)
        self.store.data.update(subset=SUBSET, subset_seed=SUBSET_SEED)
        self.store.put("runs", self.runs)
        return record

    def retain(self, keys: list[dict]) -> None:
        """Drops every run not named in ``keys`` (runs of settings no longer measured)."""
        self.runs = [r for r in self.runs if r["key"] in keys]
        self.store.put("runs", self.runs)


def _run(model, calib, subset: data.Split, config: fxq.QConfig) -> dict:
    start = time.perf_counter()
    qmodel = fxq.quantize(model, calib, config)
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(qmodel, subset), "quantize_s": round(seconds, 1)}


def grid(dataset: str) -> list[dict]:
    """Accuracy of every weight rule × activation rule at W8A8 and W4A8 (per-tensor weights)."""
    torch.set_num_threads(2)
    cache = Cache(RESULTS / f"sweep_grid_{dataset}.json")
    model, subset = models.load_trained(dataset), test_subset(dataset)
    calib = data.calibration_batches(dataset, 512)
    if cache.get({"float": True}) is None:
        cache.add({"float": True}, {"accuracy": accuracy(model, subset)})
    for setting, fields in SETTINGS.items():
        for weight_range in WEIGHT_RANGES:
            for act_range in ACT_RANGES:
                key = {"setting": setting, "weight_range": weight_range, "act_range": act_range}
                if cache.get(key) is None:
                    config = fxq.QConfig(weight_range=weight_range, act_range=act_range, **fields)
                    print(dataset, cache.add(key, _run(model, calib, subset, config)), flush=True)
    return cache.runs


def calibration_set(size: int, balanced: bool, seed: int, dataset: str) -> list:
    """``size`` training images: drawn from all classes in equal shares, or all of one class."""
    train = data.load(dataset, "train")
    g = torch.Generator().manual_seed(seed)
    if balanced:
        per_class = [torch.nonzero(train.labels == c).flatten() for c in range(10)]
        picks = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
        index = torch.stack([p[: -(-size // 10)] for p in picks], 1).flatten()[:size]
    else:
        cls = seed % 10
        idx = torch.nonzero(train.labels == cls).flatten()
        index = idx[torch.randperm(len(idx), generator=g)[:size]]
    return [(train.images[i], train.labels[i]) for i in index.split(64)]


def calibration(dataset: str) -> list[dict]:
    """Default-config accuracy vs the calibration set's size and class diversity, several seeds."""
    torch.set_num_threads(2)
    cache = Cache(RESULTS / f"sweep_calibration_{dataset}.json")
    model, subset = models.load_trained(dataset), test_subset(dataset)
    for size in CALIB_SIZES:
        for balanced in (True, False):
            for seed in CALIB_SEEDS:
                key = {"size": size, "balanced": balanced, "seed": seed}
                if cache.get(key) is None:
                    calib = calibration_set(size, balanced, seed, dataset)
                    print(dataset, cache.add(key, _run(model, calib, subset, fxq.QConfig())), flush=True)
    return cache.runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["grid", "calibration"])
    parser.add_argument("--dataset", choices=data.DATASETS, default="fashion")
    args = parser.parse_args(argv)
    (grid if args.kind == "grid" else calibration)(args.dataset)


if __name__ == "__main__":
    main()
