"""fxq on networks that are not ResNets, trained on Fashion-MNIST by scripts/train.py.

    python -m scripts.branched          # results/branched.json + the README tables

For each network of ``scripts.models.BRANCHED`` (MobileNetV2, MobileNetV3-small, an
Inception-style net joined by ``torch.cat``): full 10k test set accuracy of the float model, of
fxq at the W8A8 defaults and of torch.ao FX x86 PTQ (reference only), all calibrated on the same
512 training images. Then MobileNetV2 with one weight scale per tensor (``per_channel=False``),
with and without cross-layer equalization, at 8, 6 and 4 weight bits (the other methods the
defaults for the width) — the classic case for it (Nagel et al. 2019 report ImageNet MobileNetV2
per-tensor 8-bit near chance without it) — and how far apart the depthwise convs' channel
ranges are before and after.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from fxq.analysis.comparison import folded_float
from scripts import data, models, readme
from scripts.evaluate import torch_ao_x86
from scripts.readme import vs_float
from scripts.train import accuracy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "branched.json"
CLE_MODEL = "fashion_mobilenet_v2"
CLE_WIDTHS = (8, 6, 4)  # weight bits; 8-bit activations


def quantized_accuracy(model, calib, test, config: fxq.QConfig) -> tuple[float, float]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, calib, config)
    seconds = time.perf_counter() - start
    return accuracy(qmodel, test), seconds


def measure() -> dict:
    test = data.load("fashion", "test")
    calib = data.calibration_batches("fashion", 512)
    results = {}
    for name in models.BRANCHED:
        model = models.load_trained(name)
        float_acc = accuracy(model, test)
        fxq_acc, seconds = quantized_accuracy(model, calib, test, fxq.QConfig())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer_acc = accuracy(torch_ao_x86(model, calib), test)
        results[name] = {"float": float_acc, "fxq": fxq_acc, "torch.ao": peer_acc, "fxq_seconds": seconds}
        print(name, results[name], flush=True)
    model = models.load_trained(CLE_MODEL)
    for bits in CLE_WIDTHS:
        for equalize in (False, True):
            config = fxq.QConfig(weight_bits=bits, per_channel=False, cross_layer_equalization=equalize)
            acc, _ = quantized_accuracy(model, calib, test, config)
            spread = depthwise_spread(folded_float(model, config))
            results.setdefault("per_tensor_cle", {})[f"W{bits}A8 {'CLE' if equalize else 'no CLE'}"] = {
                "accuracy": acc, "depthwise_spread": spread}
            print(bits, equalize, acc, spread, flush=True)
    return results


def depthwise_spread(folded) -> float:
    """The median over depthwise convs of (largest / smallest channel weight range): how badly
    one scale per tensor fits them (1 is perfect)."""
    ratios = []
    for module in folded.modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
            ranges = module.weight.detach().abs().flatten(1).amax(1)
            ratios.append(float(ranges.max() / ranges[ranges > 0].min()))
    return statistics.median(ratios)


def tables(results: dict) -> tuple[str, str]:
    rows = []
    for name in models.BRANCHED:
        r = results[name]
        rows.append([name, models.RECIPES[name].architecture, f"{r['float']:.2f}", f"{r['fxq']:.2f}",
                     vs_float(r['fxq'], r['float']), f"{r['torch.ao']:.2f}", vs_float(r['torch.ao'], r['float'])])
    trained = tabulate(rows, headers=["model", "network", "float %", "fxq W8A8 %", "fxq vs float", "torch.ao %",
                                      "torch.ao vs float"], tablefmt="github")
    float_acc = results[CLE_MODEL]["float"]
    cle_rows = [[f"per-tensor {name}", f"{r['accuracy']:.2f}", vs_float(r['accuracy'], float_acc),
                 f"{r['depthwise_spread']:.1f}"] for name, r in results["per_tensor_cle"].items()]
    return trained, tabulate(cle_rows, headers=["MobileNetV2 (Fashion-MNIST)", "test acc %", "vs float",
                                                "depthwise channel-range spread (median)"], tablefmt="github")


def main() -> None:
    torch.set_num_threads(2)
    results = measure()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    trained, cle = tables(results)
    readme.write("branched", trained)
    readme.write("branched-cle", cle)
    print(trained, cle, sep="\n\n")


if __name__ == "__main__":
    main()
