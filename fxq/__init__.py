"""fxq: post-training integer quantization of PyTorch CNNs, as torch.fx graph passes.

    import fxq
    qmodel = fxq.quantize(model, calib_loader)   # config=fxq.QConfig() by default
    logits = qmodel(images)                      # float in, float logits out

The public names are loaded on first use (PEP 562), so ``import fxq.config`` or
``import passes.convert`` pulls in only what it needs: the passes depend on fxq's core, and the
top-level API, which runs the passes, is imported only when asked for.
"""
from __future__ import annotations

import importlib

# public name -> the module defining it
_EXPORTS = {
    "InvalidModelFile": "fxq.serialize", "load": "fxq.serialize", "save": "fxq.serialize",
    "PASSES": "fxq.api", "quantize": "fxq.api",
    "PassContext": "fxq.context", "QConfig": "fxq.config",
    "FloatFallbackWarning": "fxq.ops.fallback",
    "compare": "fxq.comparison", "evaluate": "fxq.evaluation", "explain": "fxq.explanation", "simulate": "fxq.twin",
    "search_bits": "fxq.mixed",
    "export_onnx": "fxq.onnx_export", "deploy": "fxq.deployed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
