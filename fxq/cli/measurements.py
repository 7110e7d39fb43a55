"""The float / fxq / deployed table of `fxq evaluate` and `fxq report`."""
from __future__ import annotations

import importlib.util

import torch
from torch import fx, nn

from fxq import distributed, measure, outputs
from fxq.evaluation import evaluate

# what the table measures when the model returns no classifier logits (`fxq.outputs.logits`)
AGREEMENT_NOTE = ("the model returns no classifier logits, so the table shows its outputs against the float "
                  "model's instead of an accuracy: the worst output's SQNR, and the share of positions whose "
                  "largest channel is the float model's (per output: fxq.evaluate(qmodel, loader, model).outputs)")


def measure_rows(qmodel: fx.GraphModule, data, model: nn.Module | None, limit: int | None, runs: int,
                 deploy: bool, threads: int | None) -> list[dict]:
    """One row per model: accuracy on the test images, saved size, latency at batch 1 and at the
    batch size (median of ``runs``). Under torchrun the ranks share the test images
    (`fxq.evaluate`) and rank 0 alone times the latency, so that no rank competes with it."""
    candidates = []
    if model is not None:
        candidates.append(("float32", model))
    candidates.append(("fxq (integer executor)", qmodel))
    if deploy and importlib.util.find_spec("onnxruntime") is not None:
        import fxq
        deployed = fxq.deploy(qmodel, data.example(1), threads=threads or 2)
        agreement = "bit-exact" if deployed.bit_exact else "within a few steps"
        candidates.append((f"fxq deployed (onnxruntime, {agreement})", deployed))
    x1, xb = data.example(1), data.example(data.batch_size)
    rows, float_row = [], None
    with torch.no_grad():
        classifier = outputs.logits(qmodel(x1)) is not None
    for name, m in candidates:
        row = {"model": name, **(_accuracy(m, data, limit, name, float_row) if classifier
                                 else _agreement(m, data, limit, name, model))}
        size = measure.saved_bytes(m)
        timed = distributed.rank() == 0
        row.update({"size MB": round(size / 1e6, 2),
                    "× float size": None if float_row is None else round(size / float_row["_bytes"], 3),
                    "ms batch 1": round(measure.latency_ms(m, x1, runs), 2) if timed else None,
                    f"ms batch {len(xb)}": round(measure.latency_ms(m, xb, max(3, runs // 4)), 1) if timed else None,
                    "_bytes": size})
        float_row = float_row or (row if model is not None else None)
        rows.append(row)
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _accuracy(m, data, limit: int | None, name: str, float_row: dict | None) -> dict:
    accuracy = evaluate(m, data.evaluation(limit, f"accuracy of {name}")).accuracy
    return {"accuracy %": round(accuracy, 2),
            "vs float (points)": None if float_row is None else round(accuracy - float_row["accuracy %"], 2)}


def _agreement(m, data, limit: int | None, name: str, model: nn.Module | None) -> dict:
    """The worst output's SQNR and class agreement against the float model (none for its own row)."""
    if model is None or m is model:
        return {"worst output SQNR dB": None, "same class %": None}
    rows = evaluate(m, data.evaluation(limit, f"outputs of {name}"), model).outputs.rows
    agreements = [agree for _, _, agree in rows if agree is not None]
    return {"worst output SQNR dB": round(min(sqnr for _, sqnr, _ in rows), 1),
            "same class %": round(min(agreements), 2) if agreements else None}
