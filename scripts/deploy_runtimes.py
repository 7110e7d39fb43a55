"""fxq's exported model on each runtime (`fxq.deploy(..., runtime=...)`) against fxq's own integer executor.

    python -m scripts.deploy_runtimes    # results/deploy_runtimes.json + the README block "deploy-runtimes"

For the committed suite models at W8A8 (512 calibration images, ``QConfig(requantize="onnxruntime")``: the
arithmetic onnxruntime runs exactly), on the full test set: each runtime's accuracy, the share of images whose
outputs are identical to the executor's, of identical logits, the largest difference in output steps, the
share predicting the executor's class, how many lookup tables run as float ops
(`fxq.deployment.float_tables`); and the median latency at batch 1 and 32 on 2 threads. Every number names
the CPU it ran on.
"""
from __future__ import annotations

import statistics
import time

import torch
from tabulate import tabulate

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


def main() -> None:
    torch.set_num_threads(THREADS)
    store = Store(FOLDER / "deploy_runtimes.json")
    results = {"machine": readme.machine(THREADS), "models": {name: measure(name) for name in MODELS}}
    store.data = results
    store.save()
    readme.publish("deploy-runtimes", table(results))


if __name__ == "__main__":
    main()
