"""fxq's deployed model (ONNX in onnxruntime) against fxq's own integer executor, full test sets.

    python -m scripts.deploy_agreement     # results/deploy_agreement.json + the README table

For the committed MNIST and Fashion-MNIST ResNet-18s at W8A8 (512 calibration images), with
fxq's fixed-point requantization and with ``QConfig(requantize="onnxruntime")`` (the default):
both models' test accuracy, the share of the 10k test images on which they predict the same
class, the share of logits that are identical, and the largest logit difference in output steps.

Then the onnxruntime rows again as an x86 CPU with AVX2 alone runs them (`scripts.emulated_cpu`:
its U8S8 kernels saturate), with the weights fxq deploys there ("exact": U8U8 where a layer could
saturate); and on the first 1,000 test images with int8 weights everywhere ("u8s8", what fxq
deployed before and onnxruntime's own quantizer writes). Emulation runs about 20× slower than the
machine would.
"""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from scripts import data, emulated_cpu, models, readme

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "deploy_agreement.json"


@functools.cache
def quantized(name: str, requantize: str) -> torch.fx.GraphModule:
    """The committed model at W8A8 (512 calibration images): one per rounding for every comparison."""
    model = models.load_trained(name)
    return fxq.quantize(model, data.calibration_batches(models.RECIPES[name].dataset, 512),
                        fxq.QConfig(requantize=requantize))


def agreement(name: str, requantize: str, avx2_weights: str | None = None, limit: int | None = None) -> dict:
    """With ``avx2_weights``, the deployed model (weights in that format) runs on the emulated AVX2
    CPU; ``limit``: the first test images only."""
    qmodel, test = quantized(name, requantize), data.load(models.RECIPES[name].dataset, "test")
    images, labels = test.images[:limit], test.labels[:limit]
    with torch.no_grad():
        reference = torch.cat([qmodel(x) for x in images.split(500)])
        if avx2_weights is None:
            deployed = fxq.deploy(qmodel, threads=2)
            runtime = torch.cat([deployed(x) for x in images.split(500)])
        else:
            buffer = io.BytesIO()
            fxq.export_onnx(qmodel, buffer, avx2_weights)
            runtime = torch.from_numpy(emulated_cpu.run(buffer.getvalue(), images.numpy()))
    step = qmodel.get_submodule("dequantize").scale.item()
    return {"reference_accuracy": 100 * float((reference.argmax(1) == labels).float().mean()),
            "deployed_accuracy": 100 * float((runtime.argmax(1) == labels).float().mean()),
            "same_prediction": 100 * float((reference.argmax(1) == runtime.argmax(1)).float().mean()),
            "identical_logits": 100 * float((reference == runtime).float().mean()),
            "max_steps": round(float((reference - runtime).abs().max() / step))}


def main() -> None:
    torch.set_num_threads(2)
    results = {f"{name} {mode}": agreement(name, mode) for name in ("mnist", "fashion")
               for mode in ("fixed_point", "onnxruntime")}
    if emulated_cpu.available():
        for name in ("mnist", "fashion"):
            results[f"{name} onnxruntime AVX2-exact"] = agreement(name, "onnxruntime", "exact")
            results[f"{name} onnxruntime AVX2-u8s8 (1k images)"] = agreement(name, "onnxruntime", "u8s8", 1000)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    rows = [[*name.split(maxsplit=1), f"{r['reference_accuracy']:.2f}", f"{r['deployed_accuracy']:.2f}",
             f"{r['same_prediction']:.2f} %", f"{r['identical_logits']:.2f} %", r["max_steps"]]
            for name, r in results.items()]
    text = tabulate(rows, headers=["ResNet-18", "requantize (on emulated AVX2: weights)", "fxq executor %",
                                   "deployed (onnxruntime) %", "same class", "identical logits",
                                   "largest logit difference (steps)"],
                    tablefmt="github")
    readme.publish("deploy", text)


if __name__ == "__main__":
    main()
