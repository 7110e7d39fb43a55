"""Learned rounding and ranges (`passes.reconstruct`) on the depthwise, squeeze-excite and concat
networks, below 8 bits, with and without it.

    python -m scripts.reconstruct_study            # results/reconstruct.json + the README block
    python -m scripts.reconstruct_study --fresh    # measure again what the JSON already holds

Full 10k Fashion-MNIST test sets, 512 training images to calibrate (and learn on), the defaults
for each width otherwise; seconds are `fxq.quantize`'s wall time (calibration and learning).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from scripts import data, models, readme
from scripts.readme import vs_float
from scripts.train import accuracy

RESULTS = Path(__file__).resolve().parent.parent / "results" / "reconstruct.json"
NETWORKS = tuple(models.BRANCHED)  # `--networks` measures a few of them
WIDTHS = ((4, 8), (4, 4), (3, 3))
THREADS = 2


def measure(fresh: bool, networks: list[str]) -> dict:
    results = {} if fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    test, calib = data.load("fashion", "test"), data.calibration_batches("fashion", 512)
    for name in networks:
        model = models.load_trained(name)
        entry = results.setdefault(name, {})
        if "float" not in entry:
            entry["float"] = accuracy(model, test)
        for weight_bits, act_bits in WIDTHS:
            for learn in (False, True):
                key = f"W{weight_bits}A{act_bits} {'learned' if learn else 'rule'}"
                if key in entry:
                    continue
                config = fxq.QConfig(weight_bits=weight_bits, act_bits=act_bits, reconstruct=learn)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
                    qmodel = fxq.quantize(model, calib, config)
                entry[key] = {"accuracy": accuracy(qmodel, test), "seconds": time.perf_counter() - start}
                print(name, key, entry[key], flush=True)
                RESULTS.parent.mkdir(exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=1))
    results["machine"] = readme.machine(THREADS)
    RESULTS.write_text(json.dumps(results, indent=1))
    return results


def table(results: dict, networks: list[str]) -> str:
    rows = []
    for name in networks:
        entry = results[name]
        for weight_bits, act_bits in WIDTHS:
            rule, learned = (entry[f"W{weight_bits}A{act_bits} {kind}"] for kind in ("rule", "learned"))
            rows.append([name, models.RECIPES[name].architecture, f"{entry['float']:.2f}", f"W{weight_bits}A{act_bits}",
                         vs_float(rule["accuracy"], entry["float"]), vs_float(learned["accuracy"], entry["float"]),
                         f"{rule['seconds']:.0f}", f"{learned['seconds']:.0f}"])
    m = results["machine"]
    return (tabulate(rows, headers=["model", "network", "float %", "width", "weight rule vs float",
                                    "learned vs float", "s (rule)", "s (learned)"], tablefmt="github")
            + f"\n\n{m['cpu']} ({m['capability']}), torch {m['torch']}, {m['threads']} threads; "
            f"`python -m scripts.reconstruct_study{_subset(networks)}`.")


def _subset(networks: list[str]) -> str:
    return "" if list(networks) == list(NETWORKS) else " --networks " + " ".join(networks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="measure again what results/reconstruct.json holds")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    readme.publish("reconstruct", table(measure(args.fresh, args.networks), args.networks))


if __name__ == "__main__":
    main()
