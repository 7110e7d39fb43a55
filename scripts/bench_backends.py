"""The integer graph's accumulator backends (`fxq.integers.gemm`) against float32 torch, on this CPU.

    python -m scripts.bench_backends       # results/bench_backends.json + the README table

Rows, at batches 32 and 256, two threads, medians: the float model in torch (float32), and fxq's
integer graph with each backend forced — "integer" (``torch._int_mm``; fast with VNNI),
"float32" (convs on chunks of input channels; the choice on an AVX2-only CPU, where
``torch._int_mm`` is 12–59× slower than float32) — and with the timed choice (what a user gets).
Shapes: the committed MNIST ResNet-18 (1×28×28) and torchvision ResNet-18 at 3×224×224. Then the
GEMM shapes of DESIGN.md's AVX2 measurement, ``torch._int_mm`` against a float32 matmul.
Every row names the CPU it ran on (``torch.backends.cpu.get_cpu_capability()``).
"""
from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from fxq.analysis.measure import latency_ms
from fxq.integers import gemm
from fxq.ops.layers import QLayer
from scripts import data, models, readme, zoo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "bench_backends.json"
BATCHES, THREADS = (32, 256), 2
GEMMS = [(784, 576, 64), (196, 2304, 256)]


def median_ms(run, x, seconds: float = 2.0) -> float:
    return latency_ms(run, x, 3, seconds, most=20)


def setup(shape: str):
    if shape == "mnist":
        return models.load_trained("mnist").eval(), data.calibration_batches("mnist", 512)
    zoo.SIZE = 224
    model = zoo.build("resnet18")
    return model, list(zoo.images(128, 1).split(32))


def backends_used(qmodel) -> str:
    counts = collections.Counter(str(m.backend) for m in qmodel.modules() if isinstance(m, QLayer))
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items()))


def bench(shape: str) -> list[dict]:
    model, calib = setup(shape)
    qmodel = fxq.quantize(model, calib)
    sample = (calib[0][0] if isinstance(calib[0], (tuple, list)) else calib[0])[:1]
    rows = []
    for batch in BATCHES:
        x = sample.expand(batch, *sample.shape[1:]).contiguous() + 0.01 * torch.randn(batch, *sample.shape[1:])
        float_ms = median_ms(model, x)
        rows.append({"shape": shape, "batch": batch, "run": "float32 torch", "ms": float_ms, "x_float": 1.0})
        for backend in (*sorted(gemm.exact("cpu")), None):  # one this CPU gets wrong is refused by fxq
            with gemm.forced(backend) if backend else contextlib.nullcontext():
                ms = median_ms(qmodel, x)
            rows.append({"shape": shape, "batch": batch, "run": f"fxq integer graph, {backend or 'timed choice'}",
                         "ms": ms, "x_float": ms / float_ms, "backends": backends_used(qmodel)})
            print(rows[-1], flush=True)
    return rows


def gemm_rows() -> list[dict]:
    rows = []
    for m, k, n in GEMMS:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
        af, bf = a.float(), b.float()
        int_ms = median_ms(lambda _: torch._int_mm(a, b), None, 0.5)
        float_ms = median_ms(lambda _: af @ bf, None, 0.5)
        rows.append({"gemm": f"{m}×{k} @ {k}×{n}", "int_mm_ms": int_ms, "float32_ms": float_ms})
    return rows


def table(results: dict) -> str:
    machine = results["machine"]
    head = (f"Measured on {machine['cpu']} (torch capability {machine['capability']}), {machine['threads']} "
            f"threads, torch {machine['torch']}; backends admitted here: {', '.join(results['admitted'])}.")
    body = [[r["shape"], r["batch"], r["run"], f"{r['ms']:.1f}", f"{r['x_float']:.2f}", r.get("backends", "")]
            for r in results["rows"]]
    gemms = [[g["gemm"], f"{g['int_mm_ms']:.2f}", f"{g['float32_ms']:.2f}"] for g in results["gemms"]]
    return "\n\n".join([head, tabulate(body, headers=["shape", "batch", "run", "ms", "× float32 torch",
                                                      "layers' backends"], tablefmt="github"),
                        tabulate(gemms, headers=["int8 GEMM shape", "torch._int_mm ms", "float32 matmul ms"],
                                 tablefmt="github")])


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = [row for shape in ("mnist", "resnet18_224") for row in bench(shape)]
    results = {"command": "python -m scripts.bench_backends", "machine": readme.machine(THREADS),
               "admitted": sorted(str(b) for b in gemm.admitted("cpu")), "rows": rows, "gemms": gemm_rows()}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    text = table(results)
    readme.publish("bench-backends", text)


if __name__ == "__main__":
    main()
