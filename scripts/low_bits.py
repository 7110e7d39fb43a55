"""Below 8 bits: the measurements behind docs/low_bits.md, cached in results/low_bits_<dataset>.json.

    python -m scripts.low_bits                          # both data sets
    python -m scripts.low_bits --dataset fashion        # run what is not cached yet
    python -m scripts.low_bits_report                   # then write docs/low_bits.md and its plots

Accuracy is on the fixed 2,000-image test subset of scripts/sweeps.py (the "full 10k" rows on
the whole test set); calibration uses 512 training images. Size is the bytes `fxq.save` writes
(bit-packed weights, biases, scales, graph), against the float state_dict file.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import time

import torch

import fxq
from fxq.analysis.measure import saved_bytes
from scripts import data, models
from scripts.sweeps import RESULTS, Cache, key_of, test_subset
from scripts.train import accuracy

SETTINGS = {  # name → (weight bits, act bits, per-channel weights)
    "W8A8": (8, 8, True), "W6A6": (6, 6, True), "W4A8": (4, 8, True), "W4A4": (4, 4, True),
    "W2A8": (2, 8, True), "W4A8 per-tensor": (4, 8, False),
}
METHODS = {  # cumulative, as the table reads left to right
    "min-max": dict(weight_range="minmax", act_range="minmax", cross_layer_equalization=False,
                    bias_correction=False, keep_first_last_8bit=False),
    "best ranges": dict(weight_range="output_aware", act_range="mse", cross_layer_equalization=False,
                        bias_correction=False, keep_first_last_8bit=False),
    "+ CLE": dict(weight_range="output_aware", act_range="mse", cross_layer_equalization=True,
                  bias_correction=False, keep_first_last_8bit=False),
    "+ bias correction": dict(weight_range="output_aware", act_range="mse", cross_layer_equalization=True,
                              bias_correction=True, keep_first_last_8bit=False),
    "first/last 8-bit": dict(weight_range="output_aware", act_range="mse", cross_layer_equalization=True,
                             bias_correction=True, keep_first_last_8bit=True),
    "fxq defaults": {},
}
MIXED = ("W6A6", "W4A8", "W4A4")  # widths where a mixed assignment has room on both sides
CURVE_BUDGETS = (8, 6, 5, 4, 3, 2)
PLACEMENT_WIDTHS = (8, 6, 4)


def config_of(setting: str, method: dict, **extra) -> fxq.QConfig:
    weight_bits, act_bits, per_channel = SETTINGS[setting]
    return fxq.QConfig(weight_bits=weight_bits, act_bits=act_bits, per_channel=per_channel,
                       **method, **extra)


def float_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


class Runner:
    """Quantize, measure, cache: one configuration (plus overrides) at a time."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.cache = Cache(RESULTS / f"low_bits_{dataset}.json")
        self.model = models.load_trained(dataset)
        self.subset = test_subset(dataset)
        self.calib = data.calibration_batches(dataset, 512)
        self._full = None

    def float_row(self) -> dict:
        key = {"float": True}
        return self.cache.get(key) or self.cache.add(key, {
            "accuracy": accuracy(self.model, self.subset), "bytes": float_bytes(self.model),
            "full_accuracy": accuracy(self.model, self.full())})

    def full(self) -> data.Split:
        self._full = self._full or data.load(self.dataset, "test")
        return self._full

    def run(self, config: fxq.QConfig, overrides=None, full: bool = False, **tags) -> dict:
        key = key_of(config, **tags, **({"full": True} if full else {}))
        found = self.cache.get(key)
        if found is not None:
            return found
        start = time.perf_counter()
        qmodel = fxq.quantize(self.model, self.calib, config, overrides=overrides)
        seconds = time.perf_counter() - start
        result = {"accuracy": accuracy(qmodel, self.subset), "bytes": saved_bytes(qmodel),
                  "quantize_s": round(seconds, 1)}
        if full:
            result["full_accuracy"] = accuracy(qmodel, self.full())
        print(self.dataset, tags or "", {k: v for k, v in key.items() if k in ("weight_bits", "act_bits")},
              result, flush=True)
        return self.cache.add(key, result)

    def mixed(self, setting: str, budgets) -> dict:
        """fxq.search_bits at the setting's activation width; the curve over ``budgets``."""
        weight_bits, act_bits, _ = SETTINGS[setting]
        key = {"search_bits": setting, "budgets": list(budgets)}
        found = self.cache.get(key)
        if found is not None:
            return found
        base = fxq.QConfig(act_bits=act_bits)  # each width gets its defaults (QConfig.with_bits)
        result = fxq.search_bits(self.model, self.calib, weight_bits, base, candidates=(2, 4, 6, 8),
                                 curve_budgets=budgets,
                                 eval_loader=list(zip(self.subset.images.split(500), self.subset.labels.split(500))))
        chosen = next(p for p in result.curve if p.budget == weight_bits)
        qmodel = fxq.quantize(self.model, self.calib, base, overrides=result.overrides)
        record = {"bits": result.bits, "accuracy": chosen.accuracy, "bytes": saved_bytes(qmodel),
                  "curve": [dataclasses.asdict(p) for p in result.curve]}
        print(self.dataset, key, {k: v for k, v in record.items() if k != "curve"}, flush=True)
        return self.cache.add(key, record)


def defaults_study() -> list[tuple[str, dict]]:
    """The runs behind the defaults below 8 bits: CLE and bias correction on and off, on top of the
    best ranges, at the discriminating widths (full 10k test set, Fashion-MNIST)."""
    return [(setting, {**METHODS["best ranges"], "cross_layer_equalization": cle, "bias_correction": bc})
            for setting in ("W4A4", "W4A8 per-tensor") for cle in (False, True) for bc in (False, True)]


def run_all(dataset: str) -> None:
    torch.set_num_threads(1)  # two data sets run side by side on the two cores
    runner = Runner(dataset)
    runner.float_row()
    for setting in SETTINGS:
        runner.run(config_of(setting, {}), full=True)  # the headline: fxq defaults, full 10k
    for setting in SETTINGS:
        for name, method in METHODS.items():
            # 8 bits: nothing to recover; defaults: the headline run above
            if name != "fxq defaults" and (setting != "W8A8" or name == "min-max"):
                runner.run(config_of(setting, method))
    runner.run(config_of("W4A8 per-tensor", {**METHODS["min-max"], "cross_layer_equalization": True}))
    for bits in PLACEMENT_WIDTHS:
        for placement in fxq.config.PLACEMENTS:
            for method in ("min-max", "fxq defaults"):
                config = fxq.QConfig(weight_bits=bits, act_bits=bits, placement=placement, **METHODS[method])
                runner.run(config, full=config == config_of(f"W{bits}A{bits}", {}))
    if dataset == "fashion":
        for setting, method in defaults_study():
            runner.run(config_of(setting, method), full=True)
    runner.mixed("W4A8", CURVE_BUDGETS)
    for setting in MIXED:
        if setting != "W4A8":
            runner.mixed(setting, (SETTINGS[setting][0],))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=data.DATASETS, help="one data set (default: both)")
    args = parser.parse_args(argv)
    for dataset in [args.dataset] if args.dataset else data.DATASETS:
        run_all(dataset)


if __name__ == "__main__":
    main()
