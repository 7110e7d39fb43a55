"""On a machine with a CUDA GPU: is fxq's integer graph exact there, and how fast is each backend?

    python -m scripts.gpu_check            # results/gpu_check.json + a table

For the committed MNIST ResNet-18 and Fashion-MNIST MobileNetV2 (grouped and depthwise convs):
quantize with the batches on the GPU and on the CPU (the two models must be equal buffer for
buffer), then run the integer graph on the GPU with each accumulator backend forced
(`fxq.integers.gemm`: the int8 GEMM pads its operands to what CUDA's ``torch._int_mm`` takes) and with
the timed choice, on the full test set: every logit must equal the CPU's. Latency at batch 256
against the float model on the same GPU. Exits 1 on any difference.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from fxq.analysis.measure import latency_ms
from fxq.integers import gemm
from scripts import data, models

RESULTS = Path(__file__).resolve().parent.parent / "results" / "gpu_check.json"
MODELS = ("mnist", "fashion_mobilenet_v2")


def check(name: str) -> list[dict]:
    dataset = models.RECIPES[name].dataset
    model, test = models.load_trained(name).eval(), data.load(dataset, "test")
    batches = data.calibration_batches(dataset, 512)
    on_cpu = fxq.quantize(model, batches)
    on_gpu = fxq.quantize(copy.deepcopy(model).cuda(), [b.cuda() for b in batches])
    same_model = all(torch.equal(v, on_gpu.state_dict()[k]) for k, v in on_cpu.state_dict().items())
    with torch.no_grad():
        reference = torch.cat([on_cpu(x) for x in test.images.split(500)])
    gpu_model, float_model = copy.deepcopy(on_cpu).cuda(), copy.deepcopy(model).cuda()
    x256 = test.images[:256].cuda()
    rows = [{"model": name, "run": "float32 torch", "ms_b256": latency_ms(float_model, x256, 10)}]
    for backend in [None, *sorted(gemm.exact("cuda"))]:
        with gemm.forced(backend) if backend else contextlib.nullcontext():
            with torch.no_grad():
                logits = torch.cat([gpu_model(x.cuda()).cpu() for x in test.images.split(500)])
            rows.append({"model": name, "run": f"fxq integer graph, {backend or 'timed choice'}",
                         "calibration_equal": same_model, "identical_logits": bool(torch.equal(logits, reference)),
                         "ms_b256": latency_ms(gpu_model, x256, 10)})
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a machine with a GPU")
    rows = [row for name in MODELS for row in check(name)]
    device = torch.cuda.get_device_name()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows,
                                   "choices": {str(k): str(v) for k, v in gemm.choices().items()}}, indent=1))
    print(device)
    print(tabulate([[r["model"], r["run"], r.get("calibration_equal", ""), r.get("identical_logits", ""),
                     f"{r['ms_b256']:.2f}"] for r in rows],
                   headers=["model", "run", "CUDA calibration = CPU", "logits = CPU", "ms at batch 256"]))
    if not all(r.get("identical_logits", True) and r.get("calibration_equal", True) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
