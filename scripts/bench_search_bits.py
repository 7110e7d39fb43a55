"""Benchmark: `fxq.search_bits` on a ResNet-18 at 224×224, the size issue 30 asks to answer in 5 min.

    python -m scripts.bench_search_bits             # results/bench_search_bits.json + the README block
    python -m scripts.bench_search_bits --profile   # and the 25 most expensive calls (cProfile)

torchvision's ResNet-18 with random features and a fitted head (`model`), 512
Fashion-MNIST training images upscaled to 3×224×224 to calibrate and 128 test images to score
(accuracy on their labels), the default candidate widths
(2, 3, 4, 5, 6, 8) and a 5-bit budget, two threads; the whole call is timed, the progress bars
show its phases.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate

import fxq
from scripts import data, readme
from scripts.zoo import settled

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
SIZE, CALIBRATION, SCORED, PROBE, BATCH = 224, 512, 128, 1024, 64


def batches(split: str, start: int, count: int) -> list[torch.Tensor]:
    """Images ``start`` … ``start + count`` of Fashion-MNIST's ``split``, normalized, 3×224×224, in batches."""
    images = data.load("fashion", split).images[start:start + count]
    upscaled = F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return list(upscaled.contiguous().split(BATCH))


def model() -> torch.nn.Module:
    """ResNet-18's random features, batch norm settled on the images, and a 10-class head fitted
    to them (ridge regression on ``PROBE`` training images the calibration does not use): a
    classifier whose accuracy the curve can show, made in seconds."""
    torch.manual_seed(0)
    probe = batches("train", CALIBRATION, PROBE)
    net = settled(torchvision.models.resnet18(weights=None), probe[:4])
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        features = torch.cat([net(batch) for batch in probe]).double()
    labels = data.load("fashion", "train").labels[CALIBRATION:CALIBRATION + PROBE]
    targets = F.one_hot(labels, 10).double()
    mean = features.mean(0)
    centered = features - mean
    ridge = 1e-3 * centered.pow(2).sum(0).mean() * torch.eye(features.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(centered.T @ centered + ridge, centered.T @ (targets - targets.mean(0)))
    net.fc = torch.nn.Linear(features.shape[1], 10)
    net.fc.weight.data = weight.T.float()
    net.fc.bias.data = (targets.mean(0) - mean @ weight).float()
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print the 25 most expensive calls")
    args = parser.parse_args()
    torch.set_num_threads(2)
    net, calib = model(), batches("train", 0, CALIBRATION)
    labels = data.load("fashion", "test").labels[:SCORED].split(BATCH)
    scored = list(zip(batches("test", 0, SCORED), labels))
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    search = fxq.search_bits(net, calib, avg_weight_bits=5.0, eval_loader=scored, progress=True)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    machine = readme.machine(torch.get_num_threads())
    result = {**machine, "seconds": seconds, "avg_weight_bits": search.avg_weight_bits,
              "float_accuracy": search.float_accuracy,
              "accuracy": {f"{p.budget:g}": p.accuracy for p in search.curve}, "bits": search.bits}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_search_bits.json").write_text(json.dumps(result, indent=2))
    curve = tabulate([(f"{p.budget:g}", f"{p.avg_weight_bits:.2f}", f"{p.accuracy:.1f}") for p in search.curve],
                     headers=["budget (bits)", "avg weight bits", "accuracy (%)"],
                     tablefmt="github")
    readme.publish("bench-search-bits",
                   f"{machine['cpu']} ({machine['capability']}), {machine['threads']} threads, torch "
                   f"{machine['torch']}: `fxq.search_bits` on ResNet-18 at 224×224 ({CALIBRATION} calibration "
                   f"images, {SCORED} scored, widths 2–8, 5-bit budget) took **{seconds:.0f} s**; "
                   f"float accuracy {search.float_accuracy:.1f} %.\n\n{curve}")


if __name__ == "__main__":
    main()
