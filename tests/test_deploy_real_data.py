"""fxq.deploy against fxq's own integer executor on the full MNIST and Fashion-MNIST test sets:
with QConfig(requantize="onnxruntime") every logit of all 10,000 images is identical."""
import pytest

from scripts.deploy_agreement import agreement

pytestmark = pytest.mark.real_data


@pytest.mark.parametrize("name", ["mnist", "fashion"])
def test_onnxruntime_requantization_deploys_bit_exact_on_the_full_test_set(name):
    result = agreement(name, "onnxruntime")
    assert result["identical_logits"] == 100.0 and result["max_steps"] == 0
    assert result["deployed_accuracy"] == result["reference_accuracy"] > 90.0
