"""fxq's exported model on each runtime (`fxq.deploy(..., runtime=...)`) against fxq's own integer executor.

    python -m scripts.deploy_runtimes          # results/deploy_runtimes.json + README blocks "deploy-runtimes(-ops)"
    python -m scripts.deploy_runtimes --ops    # only OpenVINO against fxq op by op, on small random models
    python -m scripts.deploy_runtimes --tables # only onnxruntime's speed: tables as float ops and products as
                                               # QLinearMul vs Gathers

For the committed suite models at W8A8 (512 calibration images, the defaults: onnxruntime's arithmetic), on
the full test set: each runtime's accuracy, the share of images whose outputs are identical to the
executor's, of identical logits, the largest difference in output steps, the
share predicting the executor's class, how many lookup tables run as float ops
(`fxq.deployment.float_tables`); and the median latency at batch 1 and 32 on 2 threads. Every number names
the CPU it ran on.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fxq
from fxq.config import RUNTIMES
from fxq.ops.joins import QMul
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
    qmodel = fxq.quantize(models.load_trained(name), data.calibration_batches(models.RECIPES[name].dataset, 512))
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


@contextlib.contextmanager
def _products_as_pair_tables():
    """Products of two activations exported as fxq's table of every pair (a Gather), as before they
    were written as onnxruntime's QLinearMul: the same integers either way."""
    from fxq.ops.joins import PairOp, QMul
    own, QMul.to_onnx = QMul.to_onnx, PairOp.to_onnx
    try:
        yield
    finally:
        QMul.to_onnx = own


def table_speed() -> dict:
    """onnxruntime on fxq's graph written three ways, interleaved runs: every lookup table and product of
    two activations a Gather; the tables with a float form as float ops (`fxq.deployment.float_tables`);
    and the products as QLinearMul too (what `fxq.deploy` writes). MobileNetV3 (suite) at batch 1 and
    32, YOLOv8n (its yaml, batch norm settled) at 64×64, batch 8."""
    from fxq.deployment.runtimes import onnxruntime
    from scripts import zoo, zoo_vision
    mobilenet = models.load_trained("fashion_mobilenet_v3")
    cases = {"fashion_mobilenet_v3": (mobilenet, data.calibration_batches("fashion", 512),
                                      data.load("fashion", "test").images[:32], (1, 32))}
    if importlib.util.find_spec("ultralytics") is not None:
        cases["yolov8n 64×64"] = (zoo_vision.build("yolov8n"), list(zoo.images(zoo.CALIBRATION, 1).split(8)),
                                  zoo.images(8, 2), (8,))
    rows = {}
    for name, (model, calibration, images, batches) in cases.items():
        qmodel = fxq.quantize(model, calibration)
        tables = fxq.deploy(qmodel, threads=THREADS).float_tables
        products = sum(isinstance(m, QMul) for m in qmodel.modules())
        runs = {}
        for kind, chosen, paired in (("gather", (), True), ("float ops", tables, True),
                                     ("QLinearMul", tables, False)):
            buffer = io.BytesIO()
            with _products_as_pair_tables() if paired else contextlib.nullcontext():
                fxq.export_onnx(qmodel, buffer, "auto", chosen)
            runs[kind] = onnxruntime(buffer.getvalue(), THREADS)
        for batch in batches:
            x = images[:batch].numpy()
            times = {kind: [] for kind in runs}
            for run in runs.values():
                run(x)
            for _ in range(30):
                for kind, run in runs.items():
                    start = time.perf_counter()
                    run(x)
                    times[kind].append(time.perf_counter() - start)
            rows[f"{name}, batch {batch}"] = {"tables": len(tables), "products": products,
                                              **{kind: 1e3 * statistics.median(t) for kind, t in times.items()}}
            print(name, batch, rows[f"{name}, batch {batch}"], flush=True)
    return rows


def publish_tables(store: Store, machine: dict) -> None:
    store.data["tables"] = {"machine": machine, "rows": table_speed()}
    store.save()
    body = [[name, r["tables"], r["products"], f"{r['gather']:.2f}", f"{r['float ops']:.2f}", f"{r['QLinearMul']:.2f}",
             f"{r['gather'] / r['QLinearMul']:.2f}×"] for name, r in store.data["tables"]["rows"].items()]
    readme.publish("deploy-float-tables", tabulate(
        body, headers=["model, batch", "tables as float ops", "products", "ms, all Gathers",
                       "ms, tables as float ops", "ms, and products as QLinearMul", "faster"],
        tablefmt="github") + f"\n\n{machine['cpu']} ({machine['capability']}), onnxruntime, {THREADS} threads, "
        "medians of 30 interleaved runs; `python -m scripts.deploy_runtimes --tables`.")


def publish_models(store: Store, machine: dict) -> None:
    store.data.update({"machine": machine, "models": {name: measure(name) for name in MODELS}})
    store.save()
    readme.publish("deploy-runtimes", table(store.data))


def publish_ops(store: Store, machine: dict) -> None:
    store.data["ops"] = {"machine": machine, "models": op_agreement()}
    store.save()
    body = [[name, f"{r['differ']:.3f} %", r["max_steps"]] for name, r in store.data["ops"]["models"].items()]
    readme.publish("deploy-runtimes-ops", tabulate(
        body, headers=["model (OpenVINO against fxq's executor)", "outputs that differ", "largest difference (steps)"],
        tablefmt="github") + f"\n\n{machine['cpu']} ({machine['capability']}), OpenVINO's f32; "
        "`python -m scripts.deploy_runtimes --ops`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", action="store_true", help="only OpenVINO against fxq op by op")
    parser.add_argument("--tables", action="store_true", help="only the tables' float ops against Gathers")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    store, machine = Store(FOLDER / "deploy_runtimes.json"), readme.machine(THREADS)
    everything = not (args.ops or args.tables)
    for wanted, publish in ((args.tables, publish_tables), (everything, publish_models), (args.ops, publish_ops)):
        if wanted or everything:
            publish(store, machine)


if __name__ == "__main__":
    main()
