"""Layer sensitivity: accuracy with one conv/linear quantized at a time (the rest float) and
with all but one quantized, at W8A8 and W4A4; a table and a plot.

    python -m scripts.sensitivity --dataset fashion

On the fixed 2,000-image test subset of scripts/sweeps.py; calibration: 512 training images.
"Quantized" means as fxq's integer model does it: the layer's integer weights and bias, its input
and its output (before the ReLU) on fxq's grids. Writes results/sensitivity_<data set>.json and
docs/img/sensitivity_<data set>_<setting>.png (`fxq report`'s plot).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fxq
from fxq.analysis import plots
from fxq.analysis.comparison import sensitivity
from scripts import data, models, sweeps

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"W8A8": fxq.QConfig(), "W4A4": fxq.QConfig(weight_bits=4, act_bits=4)}


def run(dataset: str) -> dict:
    torch.set_num_threads(2)
    model = models.load_trained(dataset)
    calib = data.calibration_batches(dataset, 512)
    subset = sweeps.test_subset(dataset)
    report = {}
    for setting, config in SETTINGS.items():
        qmodel = fxq.quantize(model, calib, config)
        result = sensitivity(model, qmodel, subset.images, subset.labels)
        report[setting] = {"float": result.float_accuracy, "all_quantized": result.all_quantized,
                           "layers": [{"layer": n, "only": o, "all_but": a} for n, o, a in result.rows],
                           "markdown": result.to_markdown()}
        print(setting, result.float_accuracy, result.all_quantized, flush=True)
    return report


def plot(dataset: str, report: dict) -> list[Path]:
    """`fxq report`'s sensitivity plot (`fxq.analysis.plots.sensitivity`), one per setting."""
    paths = []
    for setting, r in report.items():
        png = plots.sensitivity([row["layer"] for row in r["layers"]],
                                [row["only"] - r["float"] for row in r["layers"]],
                                [row["all_but"] - r["all_quantized"] for row in r["layers"]])
        paths.append(ROOT / "docs" / "img" / f"sensitivity_{dataset}_{setting}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_bytes(png)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=data.DATASETS, default="fashion")
    args = parser.parse_args(argv)
    report = run(args.dataset)
    out = ROOT / "results" / f"sensitivity_{args.dataset}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": f"python -m scripts.sensitivity --dataset {args.dataset}",
                               "subset": sweeps.SUBSET, **report}, indent=1) + "\n")
    plot(args.dataset, report)
    for setting, r in report.items():
        print(f"\n{args.dataset} {setting}\n{r['markdown']}")


if __name__ == "__main__":
    main()
