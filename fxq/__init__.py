"""fxq: post-training integer quantization of PyTorch CNNs, as torch.fx graph passes.

    import fxq
    qmodel = fxq.quantize(model, calib_loader)   # config=fxq.QConfig() by default
    logits = qmodel(images)                      # float in, float logits out

The public names are loaded on first use (PEP 562), so ``import fxq.config`` or
``import passes.convert`` pulls in only what it needs: the passes depend on fxq's core, and the
top-level API, which runs the passes, is imported only when asked for.

    integers/    the integer arithmetic and the ranges that choose it
    graphs/      the torch.fx graph, its records, canonical forms and integer modules
    ops/         the registry: one family of ops per module, each with its integer form
    files/       the .fxq file, checked and read back without running what it carries
    deployment/  ONNX export and onnxruntime
    analysis/    comparison, explanation, bit search, reports, evaluation
    cli/         the ``fxq`` command
    api.py (``fxq.quantize``), config.py (``fxq.QConfig``), distributed.py (torch.distributed)

The modules' paths before they were grouped (``fxq.runtime``, ``fxq.gemm``, ...) still import.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

# public name -> the module defining it
_EXPORTS = {
    "InvalidModelFile": "fxq.files.serialize", "load": "fxq.files.serialize", "save": "fxq.files.serialize",
    "PASSES": "fxq.api", "quantize": "fxq.api",
    "PassContext": "fxq.graphs.context", "QConfig": "fxq.config",
    "FloatFallbackWarning": "fxq.ops.fallback",
    "compare": "fxq.analysis.comparison", "evaluate": "fxq.analysis.evaluation",
    "explain": "fxq.analysis.explanation", "simulate": "fxq.graphs.twin",
    "search_bits": "fxq.analysis.mixed",
    "export_onnx": "fxq.deployment.onnx_export", "deploy": "fxq.deployment.deployed",
}
__all__ = sorted(_EXPORTS)

# module -> the folder it was moved into; ``fxq.<module>`` imports as ``fxq.<folder>.<module>``
_MOVED = {module: folder for folder, modules in {
    "integers": ("affine", "intmath", "gemm", "packing", "reference", "observers", "ranges", "weight_ranges"),
    "graphs": ("graph", "records", "canonical", "shapes", "context", "qmodules", "twin", "outputs", "suffix",
               "runtime", "dump"),
    "files": ("serialize", "schema", "saved_graph", "tensor_blob"),
    "deployment": ("onnx_export", "onnx_splice", "deployed", "saturation"),
    "analysis": ("comparison", "explanation", "mixed", "report", "plots", "evaluation", "measure", "datasets",
                 "progress"),
}.items() for module in modules}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import fxq.runtime`` (a path from before the folders) gives a module that reads every
    name from ``fxq.graphs.runtime``: the same functions and classes, the module itself untouched."""

    def find_spec(self, fullname: str, path=None, target=None):
        folder = _MOVED.get(fullname.removeprefix("fxq.")) if fullname.startswith("fxq.") else None
        return importlib.util.spec_from_loader(fullname, self) if folder else None

    def create_module(self, spec) -> types.ModuleType:
        name = spec.name.removeprefix("fxq.")
        module = types.ModuleType(spec.name)
        home = importlib.import_module(f"fxq.{_MOVED[name]}.{name}")
        module.__getattr__ = lambda name: getattr(home, name)
        module.__doc__ = home.__doc__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
