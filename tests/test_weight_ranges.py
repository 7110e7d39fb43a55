"""Weight rules on synthetic layers whose answer is known."""
import pytest
import torch

from fxq.integers.weight_ranges import SYMMETRIC_BLOCK, _quadratic_forms, greedy_rounding, quantize_weights


def correlated_layer(channels=32, k=64, samples=4000, seed=0):
    """Weights with an outlier, inputs whose features are strongly correlated (as conv patches are)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, k, generator=g, dtype=torch.float64) * 0.1
    w[0, 0] = 2.0
    base = torch.randn(8, samples, generator=g, dtype=torch.float64)
    x = torch.randn(k, 8, generator=g, dtype=torch.float64) @ base
    x += 0.3 * torch.randn(k, samples, generator=g, dtype=torch.float64)
    return w, x, x @ x.T


def output_error(w, qw, x):
    return (((w - qw.weight.double() * qw.scales[:, None]) @ x) ** 2).sum().item()


def weight_error(w, qw):
    return ((w - qw.weight.double() * qw.scales[:, None]) ** 2).sum().item()


def test_mse_threshold_of_a_gaussian_with_an_outlier():
    torch.manual_seed(0)
    w = torch.randn(1, 100_000, dtype=torch.float64)
    w[0, 0] = 30.0
    qw = quantize_weights(w, 4, True, "mse")
    threshold = qw.scales.item() * 7
    # the 4-bit (15-level) optimum for a unit Gaussian clips near 2.5σ–3σ, not at the outlier
    assert 2.0 < threshold < 3.5
    assert weight_error(w, qw) < 0.3 * weight_error(w, quantize_weights(w, 4, True, "minmax"))


def test_mse_is_chosen_per_channel_or_per_tensor():
    w, _, _ = correlated_layer()
    per_channel = quantize_weights(w, 4, True, "mse")
    per_tensor = quantize_weights(w, 4, False, "mse")
    assert len(set(per_channel.scales.tolist())) > 1 and len(set(per_tensor.scales.tolist())) == 1
    assert weight_error(w, per_channel) <= weight_error(w, per_tensor)


@pytest.mark.parametrize("per_channel", [True, False])
def test_output_aware_beats_mse_on_the_layer_output(per_channel):
    w, x, gram = correlated_layer()
    mse = quantize_weights(w, 4, per_channel, "mse")
    aware = quantize_weights(w, 4, per_channel, "output_aware", gram)
    assert output_error(w, aware, x) < 0.8 * output_error(w, mse, x)


def test_output_aware_only_rounds_each_weight_down_or_up():
    w, _, gram = correlated_layer()
    aware = quantize_weights(w, 4, True, "output_aware", gram)
    v = w / aware.scales[:, None]
    q = aware.weight.double()
    assert aware.weight.dtype == torch.int8 and aware.weight.abs().max() <= 7
    inside = v.abs() < 7
    assert ((q - torch.floor(v))[inside].abs() <= 1).all()
    assert ((q == torch.floor(v)) | (q == torch.ceil(v)))[inside].all()


def test_greedy_rounding_with_identity_gram_is_nearest_rounding():
    """With H = I the output error is the weight error, which nearest rounding minimizes."""
    torch.manual_seed(3)
    w = torch.randn(5, 300, dtype=torch.float64)
    scales = torch.full((5,), 0.05, dtype=torch.float64)
    q = greedy_rounding(w, scales, 8, torch.eye(300, dtype=torch.float64))
    assert torch.equal(q, torch.clamp(torch.round(w / 0.05), -127, 127))


def test_output_aware_needs_the_gram():
    with pytest.raises(ValueError, match="input statistics"):
        quantize_weights(torch.randn(2, 3), 8, True, "output_aware")


@pytest.mark.parametrize("k", [SYMMETRIC_BLOCK - 7, 2 * SYMMETRIC_BLOCK + 37])
def test_quadratic_forms_from_the_upper_triangle_equal_the_full_product(k):
    """The clipping search reads H's upper triangle by blocks; one block and several, uneven."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(k + 50, k, generator=g, dtype=torch.float64)
    rows = torch.randn(6, k, generator=g, dtype=torch.float64)
    gram = x.T @ x
    assert torch.allclose(_quadratic_forms(rows, gram), ((rows @ gram) * rows).sum(1), rtol=1e-12, atol=0)
