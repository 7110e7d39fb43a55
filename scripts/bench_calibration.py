"""Benchmark: how long calibration + conversion take with each activation range method.

    python -m scripts.bench_calibration --dataset fashion

Times ``fxq.quantize`` on 512 training images (median of ``--runs``), split into the
calibrate pass and the rest, and writes ``results/bench_calibration.json`` and a table.
The histogram methods read the data twice; the goal is ≤ 3× min-max.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from fxq.config import ACT_RANGES
from scripts import data, models

RESULTS = Path(__file__).resolve().parent.parent / "results"


def timed_passes(model, calib, config: fxq.QConfig) -> dict[str, float]:
    """Seconds spent in each pass of one quantization."""
    seconds: dict[str, float] = {}

    def timing(step):
        def run(gm, ctx):
            start = time.perf_counter()
            out = step(gm, ctx)
            seconds[step.__name__] = time.perf_counter() - start
            return out
        return run

    fxq.quantize(model, calib, config, passes=[timing(p) for p in fxq.PASSES])
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=data.DATASETS, default="fashion")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, calib = models.load_trained(args.dataset), data.calibration_batches(args.dataset, 512)
    rows = []
    for act_range in ACT_RANGES:
        runs = [timed_passes(model, calib, fxq.QConfig(act_range=act_range)) for _ in range(args.runs)]
        calibrate = statistics.median(r["calibrate"] for r in runs)
        convert = statistics.median(r["convert"] for r in runs)
        total = statistics.median(sum(r.values()) for r in runs)
        rows.append({"act_range": act_range, "calibrate_s": round(calibrate, 2),
                     "convert_s": round(convert, 2), "quantize_s": round(total, 2)})
    base = rows[0]["quantize_s"]
    for row in rows:
        row["vs_minmax"] = round(row["quantize_s"] / base, 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_calibration.json").write_text(json.dumps(
        {"command": "python -m scripts.bench_calibration --dataset " + args.dataset,
         "images": 512, "runs": args.runs, "rows": rows}, indent=2) + "\n")
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
