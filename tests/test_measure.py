"""Accuracy, size and latency as `fxq evaluate` and `fxq report` measure them."""
import pytest
import torch

import fxq
from fxq.analysis import measure


def test_a_quantized_models_size_is_its_saved_file_with_weights_packed_at_their_widths(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3)).eval()
    calib = [torch.randn(4, 16, 8, 8) for _ in range(3)]
    w8 = fxq.quantize(model, calib)
    w4 = fxq.quantize(model, calib, fxq.QConfig(weight_bits=4, keep_first_last_8bit=False))
    fxq.save(w4, tmp_path / "w4.fxq")
    # the same payload; torch.save names the archive's records after the file, hence not equal bytes
    assert measure.saved_bytes(w4) == pytest.approx((tmp_path / "w4.fxq").stat().st_size, rel=0.1)
    weights = 16 * 64 * 9 + 64 * 64 * 9
    assert measure.saved_bytes(w8) - measure.saved_bytes(w4) >= 0.9 * weights / 2  # 4 bits saved per weight


def test_accuracy_counts_hits_over_every_batch_and_refuses_no_data():
    model = torch.nn.Identity()
    batches = [(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1])),
               (torch.tensor([[2.0, 1.0]]), torch.tensor([0]))]
    assert measure.accuracy(model, batches) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="evaluation data is empty"):
        measure.accuracy(model, [])
