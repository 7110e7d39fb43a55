"""torchvision's classification models quantize, run on integers, agree with their twins and
their saved copies bit for bit, and export to onnxruntime (scripts/zoo.py measures them against
torch.ao)."""
import io
import warnings

import pytest
import torch

import fxq
from fxq.graphs.runtime import count_ops
from scripts import zoo

# ConvNeXt's LayerNorms have no integer form; everything else in these models does
INTEGER_SHARE = {name: 90.0 for name in zoo.MODELS} | {"convnext_tiny": 80.0}


@pytest.mark.real_data
@pytest.mark.parametrize("name", zoo.MODELS)
def test_every_zoo_model_quantizes_onto_integers_exactly(name):
    model = zoo.build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, list(zoo.images(32, 1).split(16)))
    x = zoo.images(8, 2)
    counts = count_ops(qmodel, x)
    assert 100 * counts.integer / (counts.integer + counts.float) >= INTEGER_SHARE[name], counts.float_ops
    with torch.no_grad():
        assert torch.equal(fxq.simulate(qmodel)(x), qmodel(x))
        buffer = io.BytesIO()
        fxq.save(qmodel, buffer)
        buffer.seek(0)
        assert torch.equal(fxq.load(buffer)(x), qmodel(x))
        assert zoo.sqnr_db(model(x), qmodel(x)) > 0  # it computes the model, not noise
        deployed = fxq.deploy(qmodel, threads=2)(x)  # exported to ONNX, run by onnxruntime
        assert deployed.shape == qmodel(x).shape and zoo.sqnr_db(qmodel(x), deployed) > 0
