"""fxq's deployed model (ONNX in onnxruntime) against fxq's own integer executor, full test sets.

    python -m scripts.deploy_agreement     # results/deploy_agreement.json + the README table

For the committed MNIST and Fashion-MNIST ResNet-18s at W8A8 (512 calibration images), with
fxq's fixed-point requantization (the default) and with ``QConfig(requantize="onnxruntime")``:
both models' test accuracy, the share of the 10k test images on which they predict the same
class, the share of logits that are identical, and the largest logit difference in output steps.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from scripts import data, models

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "deploy_agreement.json"
README = ROOT / "README.md"


def agreement(name: str, requantize: str) -> dict:
    model, test = models.load_trained(name), data.load(name, "test")
    qmodel = fxq.quantize(model, data.calibration_batches(name, 512), fxq.QConfig(requantize=requantize))
    deployed = fxq.deploy(qmodel, threads=2)
    with torch.no_grad():
        reference = torch.cat([qmodel(x) for x in test.images.split(500)])
        runtime = torch.cat([deployed(x) for x in test.images.split(500)])
    step = qmodel.get_submodule("dequantize").scale.item()
    return {"reference_accuracy": 100 * float((reference.argmax(1) == test.labels).float().mean()),
            "deployed_accuracy": 100 * float((runtime.argmax(1) == test.labels).float().mean()),
            "same_prediction": 100 * float((reference.argmax(1) == runtime.argmax(1)).float().mean()),
            "identical_logits": 100 * float((reference == runtime).float().mean()),
            "max_steps": round(float((reference - runtime).abs().max() / step))}


def main() -> None:
    torch.set_num_threads(2)
    results = {f"{name} {mode}": agreement(name, mode) for name in ("mnist", "fashion")
               for mode in ("fixed_point", "onnxruntime")}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    rows = [[*name.split(), f"{r['reference_accuracy']:.2f}", f"{r['deployed_accuracy']:.2f}",
             f"{r['same_prediction']:.2f} %", f"{r['identical_logits']:.2f} %", r["max_steps"]]
            for name, r in results.items()]
    text = tabulate(rows, headers=["ResNet-18", "requantize", "fxq executor %", "deployed (onnxruntime) %",
                                   "same class", "identical logits", "largest logit difference (steps)"],
                    tablefmt="github")
    start, end = "<!-- deploy:start -->", "<!-- deploy:end -->"
    readme = README.read_text()
    README.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}",
                             readme, flags=re.S))
    print(text)


if __name__ == "__main__":
    main()
