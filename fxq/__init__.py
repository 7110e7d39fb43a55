"""fxq: post-training integer quantization of PyTorch CNNs, as torch.fx graph passes.

    import fxq
    qmodel = fxq.quantize(model, calib_loader)   # config=fxq.QConfig() by default
    logits = qmodel(images)                      # float in, float logits out
"""
from fxq.api import PASSES, quantize
from fxq.config import QConfig
from fxq.context import PassContext
from fxq.explain import explain
from fxq.compare import compare
from fxq.simulate import simulate
from fxq.mixed import search_bits
from fxq.serialize import InvalidModelFile, load, save

__all__ = ["InvalidModelFile", "PASSES", "PassContext", "QConfig", "compare", "explain", "load", "quantize", "save", "search_bits", "simulate"]
