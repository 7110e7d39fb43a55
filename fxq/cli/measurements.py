"""The float / fxq / deployed table of `fxq evaluate` and `fxq report`."""
from __future__ import annotations

import importlib.util

from torch import fx, nn

from fxq import distributed, measure
from fxq.evaluation import evaluate


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
    for name, m in candidates:
        accuracy = evaluate(m, data.evaluation(limit, f"accuracy of {name}")).accuracy
        size = measure.saved_bytes(m)
        timed = distributed.rank() == 0
        row = {"model": name, "accuracy %": round(accuracy, 2),
               "vs float (points)": None if float_row is None else round(accuracy - float_row["accuracy %"], 2),
               "size MB": round(size / 1e6, 2),
               "× float size": None if float_row is None else round(size / float_row["_bytes"], 3),
               "ms batch 1": round(measure.latency_ms(m, x1, runs), 2) if timed else None,
               f"ms batch {len(xb)}": round(measure.latency_ms(m, xb, max(3, runs // 4)), 1) if timed else None,
               "_bytes": size}
        float_row = float_row or (row if model is not None else None)
        rows.append(row)
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
