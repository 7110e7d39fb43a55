"""Layer sensitivity: accuracy with one conv/linear quantized at a time (the rest float) and
with all but one quantized, at W8A8 and W4A4; a table and a plot.

    python -m scripts.sensitivity --dataset fashion

On the fixed 2,000-image test subset of scripts/sweeps.py; calibration: 512 training images.
"Quantized" means as fxq's integer model does it: the layer's integer weights and bias, its input
and its output (before the ReLU) on fxq's grids. Writes results/sensitivity_<data set>.json and
docs/img/sensitivity_<data set>.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import torch

import fxq
from fxq.comparison import sensitivity
from scripts import data, models, sweeps

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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


def plot(dataset: str, report: dict) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, (setting, r) in zip(axes, report.items()):
        names = [row["layer"] for row in r["layers"]]
        ax.plot([row["only"] - r["float"] for row in r["layers"]], "o-", label="only this layer")
        ax.plot([row["all_but"] - r["all_quantized"] for row in r["layers"]], "s-",
                label="all but this layer (vs all)")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_title(f"{dataset} {setting}: float {r['float']:.1f} %, all quantized {r['all_quantized']:.1f} %")
        ax.set_ylabel("accuracy change (points)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = ROOT / "docs" / "img" / f"sensitivity_{dataset}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
