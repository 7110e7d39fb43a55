"""Write docs/ranges.md: how one layer's weights and activations are quantized, which range each
method picks and what error it leaves, and the accuracy sweeps (from their cached JSON).

    python -m scripts.ranges_report                  # runs missing sweeps first (tens of minutes)
    python -m scripts.ranges_report --no-sweeps      # worked examples only, tables from cache
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from tabulate import tabulate

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.config import ACT_RANGES, WEIGHT_RANGES
from fxq.integers.affine import ActQParams
from fxq.integers.observers import InputGram, make_observer
from fxq.integers.weight_ranges import quantize_weights
from scripts import data, models, sweeps

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
LAYER = "layer2.0.conv1"
WEIGHT_SETTINGS = {"W8 per-channel": (8, True), "W4 per-tensor": (4, False)}


def capture(dataset: str, layer: str):
    """The folded float layer and its input and output on the 512 calibration images."""
    calib = data.calibration_batches(dataset, 512)
    folded = fxq.quantize(models.load_trained(dataset), calib, passes=fxq.PASSES[:2])
    module = folded.get_submodule(layer)
    seen = {"in": [], "out": []}

    def record(_, args, output):  # returns None, so the output is left as it is
        seen["in"].append(args[0].clone())
        seen["out"].append(output.clone())

    module.register_forward_hook(record)
    with torch.no_grad():
        for images, _ in calib:
            folded(images)
    return module, calib, torch.cat(seen["in"]), torch.cat(seen["out"])


def weight_example(module, inputs: torch.Tensor, lines: list[str], stem: str) -> None:
    gram = InputGram(module, LAYER)
    gram(inputs)
    w = module.weight.detach().double().reshape(module.weight.shape[0], -1)
    columns = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
    x = columns.transpose(1, 2).reshape(-1, w.shape[1]).double().T
    reference = w @ x
    lines += [f"Weight: {tuple(module.weight.shape)} (batch-norm folded), range "
              f"[{w.min():.4f}, {w.max():.4f}]; per-channel max |w| from "
              f"{w.abs().amax(1).min():.4f} to {w.abs().amax(1).max():.4f} "
              f"(median {w.abs().amax(1).median():.4f}): one outlier channel sets a per-tensor scale.", ""]
    rows, residuals = [], {}
    for setting, (bits, per_channel) in WEIGHT_SETTINGS.items():
        for rule in WEIGHT_RANGES:
            q = quantize_weights(module.weight, bits, per_channel, rule, gram.gram)
            w_hat = q.weight.double().reshape(w.shape) * q.scales[:, None]
            rows.append([setting, rule, f"{q.scales.min():.3g} … {q.scales.max():.3g}",
                         f"{((w - w_hat) ** 2).sum():.4g}", f"{sqnr_db(w, w_hat):.1f}",
                         f"{sqnr_db(reference, w_hat @ x):.1f}"])
            if bits == 4:
                residuals[rule] = (w / q.scales[:, None] - q.weight.double().reshape(w.shape)).flatten()
    lines += [tabulate(rows, headers=["setting", "weight_range", "scale (min … max)",
                                      "‖W − Q(W)‖²", "weight SQNR dB", "output SQNR dB ‖W·X‖"],
                       tablefmt="github"), ""]
    plt.figure(figsize=(7, 3.5))
    for rule, r in residuals.items():
        plt.hist(r.clamp(-2, 2).numpy(), bins=160, histtype="step", label=rule)
    plt.xlabel("w / s − q   (rounding error in steps; |x| > 0.5: clipped or rounded away)")
    plt.yscale("log")
    plt.legend()
    plt.title(f"{LAYER}, 4-bit per-tensor: rounding error")
    _save(f"{stem}_weight_rounding.png", lines)


def activation_example(name: str, values: torch.Tensor, lines: list[str], stem: str) -> None:
    flat = values.detach().flatten()
    rows, picks = [], {}
    for act_range in ACT_RANGES:
        for bits in (8, 4):
            observer = make_observer(fxq.QConfig(act_range=act_range, act_bits=bits, histogram_bins=2048), name)
            for chunk in values.split(64):
                observer(chunk)
            qp: ActQParams = observer.qparams()
            lo, hi = observer.range(bits)
            picks.setdefault(act_range, (lo, hi))
            x_hat = qp.dequantize(qp.quantize(flat))
            rows.append([act_range, bits, f"[{lo:.3f}, {hi:.3f}]", f"{qp.scale:.4g}", qp.zero_point,
                         f"{sqnr_db(flat, x_hat):.2f}"])
    lines += [f"{name}: {flat.numel():,} values in [{flat.min():.3f}, {flat.max():.3f}].", "",
              tabulate(rows, headers=["act_range", "bits", "range", "scale", "zero point",
                                      "SQNR dB"], tablefmt="github"), ""]
    plt.figure(figsize=(7, 3.5))
    plt.hist(flat.numpy(), bins=400, color="lightgray")
    plt.yscale("log")
    for (act_range, (lo, hi)), color in zip(picks.items(), ["k", "tab:blue", "tab:green", "tab:red", "tab:purple"]):
        plt.axvline(lo, color=color, linestyle="--", linewidth=1)
        plt.axvline(hi, color=color, linestyle="--", linewidth=1, label=act_range)
    plt.legend(fontsize=8)
    plt.title(f"{name}: histogram and the 8-bit range each method picks")
    _save(f"{stem}.png", lines)


def _save(filename: str, lines: list[str]) -> None:
    (DOCS / "img").mkdir(parents=True, exist_ok=True)
    plt.tight_layout()
    plt.savefig(DOCS / "img" / filename, dpi=110)
    plt.close()
    lines += [f"![{filename}](img/{filename})", ""]


def grid_tables(dataset: str, runs: list[dict], lines: list[str]) -> None:
    float_acc = next(r["accuracy"] for r in runs if r["key"] == {"float": True})
    lines += [f"Float accuracy on the subset: {float_acc:.2f} %. Cells: accuracy (%) and, in "
              "brackets, the change from float in points.", ""]
    for setting in sweeps.SETTINGS:
        table = []
        for weight_range in WEIGHT_RANGES:
            row = [weight_range]
            for act_range in ACT_RANGES:
                key = {"setting": setting, "weight_range": weight_range, "act_range": act_range}
                run = next((r for r in runs if r["key"] == key), None)
                row.append("—" if run is None else f"{run['accuracy']:.2f} ({run['accuracy'] - float_acc:+.2f})")
            table.append(row)
        lines += [f"**{dataset}, {setting}** (rows: weight_range, columns: act_range)", "",
                  tabulate(table, headers=["", *ACT_RANGES], tablefmt="github"), ""]


def calibration_tables(results: dict[str, list[dict]], lines: list[str]) -> None:
    plt.figure(figsize=(7, 3.5))
    for dataset, runs in results.items():
        table = []
        for balanced in (True, False):
            means = []
            for size in sweeps.CALIB_SIZES:
                accs = [r["accuracy"] for r in runs if r["key"]["size"] == size and r["key"]["balanced"] == balanced]
                means.append(statistics.mean(accs) if accs else float("nan"))
                spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
                table.append([("balanced" if balanced else "one class"), size, len(accs),
                              f"{means[-1]:.2f}{spread}"])
            plt.plot(sweeps.CALIB_SIZES, means, marker="o",
                     label=f"{dataset}, {'balanced classes' if balanced else 'one class'}")
        lines += [f"**{dataset}** (default config, W8A8 min-max; mean ± std over seeds {sweeps.CALIB_SEEDS})", "",
                  tabulate(table, headers=["calibration set", "images", "seeds", "accuracy %"],
                           tablefmt="github"), ""]
    plt.xscale("log")
    plt.xlabel("calibration images")
    plt.ylabel("test accuracy % (2,000-image subset)")
    plt.legend(fontsize=8)
    _save("calibration_study.png", lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-sweeps", action="store_true", help="use cached sweep results only")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    lines = ["# Ranges and rounding", "",
             "Generated by `python -m scripts.ranges_report` (sweeps cached in `results/`).", ""]
    for dataset in data.DATASETS:
        module, _, inputs, outputs = capture(dataset, LAYER)
        lines += [f"## {dataset}: one conv layer, `{LAYER}`", "", "### Its weights", ""]
        weight_example(module, inputs, lines, f"{dataset}")
        lines += ["### Its input and output", ""]
        activation_example(f"input of {LAYER}", inputs, lines, f"{dataset}_input")
        activation_example(f"output of {LAYER} (before its ReLU)", outputs, lines, f"{dataset}_output")
    lines += ["## Does the range matter? End accuracy, every weight rule × activation rule", "",
              f"On a fixed 2,000-image test subset (seed {sweeps.SUBSET_SEED}); calibration: 512 training images.", ""]
    for dataset in data.DATASETS:
        runs = sweeps.grid(dataset) if not args.no_sweeps else sweeps.Cache(
            sweeps.RESULTS / f"sweep_grid_{dataset}.json").runs
        if runs:
            grid_tables(dataset, runs, lines)
    lines += ["Reading the grids: at W8A8 every combination sits within a few test images of float —",
              "8 bits leave so much resolution that the range rule hardly matters here. With 4-bit",
              "per-tensor weights the weight rule decides: clipping by MSE recovers part of what",
              "min-max loses to the one outlier channel that sets a per-tensor scale, and rounding by",
              "the layer's output error (output_aware) recovers most of the rest; the activation rule",
              "still matters little at 8 bits. The worked examples above show why: the SQNR of each",
              "rule at 8 vs 4 bits.", ""]
    lines += ["## The calibration set: how many images, and how diverse", "",
              "Calibration fixes the activation ranges; it needs images that reach the ranges the",
              "test data reaches. For these batch-normalized ResNets with min-max ranges at 8 bits,",
              "the tables show the ranges from even one image, or from a single class, already cover",
              "the test data well enough: the spread over sizes and seeds is a few test images.", ""]
    results = {d: (sweeps.calibration(d) if not args.no_sweeps else
                   sweeps.Cache(sweeps.RESULTS / f"sweep_calibration_{d}.json").runs) for d in data.DATASETS}
    if all(results.values()):
        calibration_tables(results, lines)
    (DOCS / "ranges.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
