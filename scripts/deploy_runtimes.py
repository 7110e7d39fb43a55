"""fxq's exported model on each runtime (`fxq.deploy(..., runtime=...)`) against fxq's own integer executor.

    python -m scripts.deploy_runtimes          # results/deploy_runtimes.json + README blocks "deploy-runtimes(-ops)"
    python -m scripts.deploy_runtimes --ops    # only OpenVINO against fxq op by op, on small random models

For the committed suite models at W8A8 (512 calibration images, ``QConfig(requantize="onnxruntime")``: the
arithmetic onnxruntime runs exactly), on the full test set: each runtime's accuracy, the share of images whose
outputs are identical to the executor's, of identical logits, the largest difference in output steps, the
share predicting the executor's class, how many lookup tables run as float ops
(`fxq.deployment.float_tables`); and the median latency at batch 1 and 32 on 2 threads. Every number names
the CPU it ran on.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fxq
from fxq.config import RUNTIMES
from scripts import data, models, readme
from scripts.results import FOLDER, Store

MODELS = ("fashion", "mnist", "fashion_inception", "fashion_mobilenet_v2", "fashion_mobilenet_v3")
THREADS = 2


def latency_ms(run, x: torch.Tensor, runs: int = 30) -> float:
    run(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str) -> dict:
    qmodel = fxq.quantize(models.load_trained(name), data.calibration_batches(models.RECIPES[name].dataset, 512),
                          fxq.QConfig(requantize="onnxruntime"))
    test = data.load(models.RECIPES[name].dataset, "test")
    step = qmodel.get_submodule("dequantize").scale.item()
    with torch.no_grad():
        reference = torch.cat([qmodel(x) for x in test.images.split(500)])
    rows = {}
    for runtime in RUNTIMES:
        deployed = fxq.deploy(qmodel, test.images[:1], threads=THREADS, runtime=runtime)
        logits = torch.cat([deployed(x) for x in test.images.split(500)])
        same = logits == reference
        rows[runtime] = {
            "bit_exact": deployed.bit_exact,
            "float_tables": len(deployed.float_tables),
            "accuracy": 100 * float((logits.argmax(1) == test.labels).float().mean()),
            "identical_outputs": 100 * float(same.all(1).float().mean()),
            "identical_logits": 100 * float(same.float().mean()),
            "max_steps": round(float((logits - reference).abs().max() / step)),
            "same_class": 100 * float((logits.argmax(1) == reference.argmax(1)).float().mean()),
            "ms_batch1": latency_ms(deployed, test.images[:1]),
            "ms_batch32": latency_ms(deployed, test.images[:32], 15),
        }
        print(name, runtime, rows[runtime], flush=True)
    executor = 100 * float((reference.argmax(1) == test.labels).float().mean())
    return {"executor_accuracy": executor, "runtimes": rows}


def table(results: dict) -> str:
    lines = []
    for name, r in results["models"].items():
        for runtime, m in r["runtimes"].items():
            lines.append([name, runtime + (" (bit-exact)" if m["bit_exact"] else ""), m["float_tables"],
                          f"{r['executor_accuracy']:.2f}",
                          f"{m['accuracy']:.2f}", f"{m['identical_outputs']:.1f} %", f"{m['identical_logits']:.1f} %",
                          m["max_steps"], f"{m['same_class']:.2f} %", f"{m['ms_batch1']:.2f}",
                          f"{m['ms_batch32']:.1f}"])
    machine = results["machine"]
    return (tabulate(lines, headers=["model (W8A8)", "runtime", "tables as float ops", "fxq executor %",
                                     "deployed %", "identical images", "identical logits",
                                     "largest difference (steps)", "executor's class", "ms batch 1", "ms batch 32"],
                     tablefmt="github")
            + f"\n\n{machine['cpu']} ({machine['capability']}), {machine['threads']} threads; full test sets; "
            "`python -m scripts.deploy_runtimes`.")


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.relu(self.b(self.relu(self.a(x))) + x)


class _PoolLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


OP_MODELS = {"conv": lambda: nn.Conv2d(8, 16, 3, padding=1),
             "conv + ReLU": lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
             "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(8 * 12 * 12, 10)),
             "conv, ReLU, conv, residual add, ReLU": _Residual,
             "conv, global average pool, linear": _PoolLinear}


def op_agreement() -> dict:
    """OpenVINO against fxq's executor op by op: small random models (weights N(0, 0.2), 4×16 calibration
    images of N(0, 1), ``requantize="onnxruntime"``), 256 other images each."""
    rows = {}
    for name, make in OP_MODELS.items():
        torch.manual_seed(0)
        model = make()
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        qmodel = fxq.quantize(model.eval(), [torch.randn(16, 8, 12, 12) for _ in range(4)],
                              fxq.QConfig(requantize="onnxruntime"))
        x = torch.randn(256, 8, 12, 12)
        steps = (fxq.deploy(qmodel, threads=THREADS, runtime="openvino")(x) - qmodel(x)).abs()
        steps /= qmodel.get_submodule("dequantize").scale.item()
        rows[name] = {"differ": 100 * float((steps > 0.5).float().mean()), "max_steps": round(float(steps.max()))}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", action="store_true", help="only OpenVINO against fxq op by op (README block "
                                                           "deploy-runtimes-ops)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    store = Store(FOLDER / "deploy_runtimes.json")
    if not args.ops:
        store.data.update({"machine": readme.machine(THREADS), "models": {name: measure(name) for name in MODELS}})
        readme.publish("deploy-runtimes", table(store.data))
    machine = readme.machine(THREADS)
    store.data["ops"] = {"machine": machine, "models": op_agreement()}
    store.save()
    readme.publish("deploy-runtimes-ops", tabulate(
        [[name, f"{r['differ']:.3f} %", r["max_steps"]] for name, r in store.data["ops"]["models"].items()],
        headers=["model (OpenVINO against fxq's executor)", "outputs that differ", "largest difference (steps)"],
        tablefmt="github") + f"\n\n{machine['cpu']} ({machine['capability']}), OpenVINO's f32; "
        "`python -m scripts.deploy_runtimes --ops`.")


if __name__ == "__main__":
    main()
