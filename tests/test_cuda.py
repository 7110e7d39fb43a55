"""Calibration, the integer graph (every accumulator backend) and fxq.simulate on a GPU, where
there is one (this project's CI machine has none: these tests skip there; scripts/gpu_check.py
is the whole check for a GPU machine)."""
import copy

import pytest
import torch

import fxq
from fxq.integers import gemm
from tests.helpers import Residual, randomize_bn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_calibrating_on_cuda_batches_gives_the_cpu_model():
    model = randomize_bn(Residual(8))
    batches = [torch.randn(8, 8, 16, 16) for _ in range(4)]
    on_cpu = fxq.quantize(model, batches)
    on_gpu = fxq.quantize(model.cuda(), [b.cuda() for b in batches])
    assert next(model.parameters()).is_cuda  # the user's model stays where it was
    for key, value in on_cpu.state_dict().items():
        assert torch.equal(value, on_gpu.state_dict()[key]), key
    x = torch.randn(16, 8, 16, 16)
    assert torch.equal(on_gpu(x), on_cpu(x))  # the integer reference runs on the CPU


def test_the_float_twin_runs_on_cuda_and_agrees_with_the_integer_model():
    model = randomize_bn(Residual(8))
    qmodel = fxq.quantize(model, [torch.randn(8, 8, 16, 16) for _ in range(4)])
    x = torch.randn(16, 8, 16, 16)
    twin = fxq.simulate(qmodel).cuda()
    assert torch.allclose(twin(x.cuda()).cpu(), qmodel(x), atol=1e-5)


@pytest.mark.parametrize("backend", list(gemm.Backend))
def test_the_integer_graph_runs_on_cuda_with_every_backend_and_gives_the_cpu_integers(backend):
    from tests.test_ops_layers import Grouped
    model = Grouped().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 12, 12) for _ in range(4)])
    x = torch.randn(32, 3, 12, 12)
    with gemm.forced(backend):
        assert torch.equal(copy.deepcopy(qmodel).cuda()(x.cuda()).cpu(), qmodel(x))
