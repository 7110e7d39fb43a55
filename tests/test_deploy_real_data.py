"""fxq.deploy against fxq's own integer executor on the full MNIST and Fashion-MNIST test sets:
in onnxruntime's arithmetic (the default) every logit of all 10,000 images is identical, squeeze-excite
products (MobileNetV3's, as QLinearMul) included. And as an
x86 CPU with AVX2 alone runs onnxruntime (QEMU's Haswell model: U8S8 kernels that saturate), on
the first 500 test images the weights fxq deploys there keep every logit identical, and on the
first 100 the int8 weights onnxruntime's own quantizer writes do not (about 22 % of their logits
are identical: a hundred images show it; every emulated image costs a tenth of a second). On a CPU
that already has AVX2 alone, the same run goes without the emulator (`emulated_cpu.native`)."""
import pytest

from scripts import emulated_cpu
from scripts.deploy_agreement import agreement

pytestmark = pytest.mark.real_data
EMULATED_IMAGES = 500
CONTROL_IMAGES = 100


# MobileNetV3's executor is slow (2.5 min for its 10k images on 2 loaded cores: its lookup tables):
# 1,000 images, where every pair of each product is also checked against onnxruntime in the unit tests
@pytest.mark.parametrize("name, limit", [("mnist", None), ("fashion", None), ("fashion_mobilenet_v3", 1000)])
def test_onnxruntime_requantization_deploys_bit_exact_on_the_full_test_set(name, limit):
    result = agreement(name, "onnxruntime", limit=limit)
    assert result["identical_logits"] == 100.0 and result["max_steps"] == 0
    assert result["deployed_accuracy"] == result["reference_accuracy"] > 85.0


needs_emulator = pytest.mark.skipif(not emulated_cpu.available(), reason="needs x86-64 and qemu-x86_64 (make setup)")


@needs_emulator
def test_the_emulated_avx2_cpus_onnxruntime_saturates_and_fxq_finds_out():
    assert emulated_cpu.saturates()


@needs_emulator
@pytest.mark.parametrize("name", ["mnist", "fashion"])
def test_on_an_avx2_cpu_the_deployed_weights_keep_every_logit_and_int8_weights_do_not(name):
    exact = agreement(name, "onnxruntime", "exact", limit=EMULATED_IMAGES)
    assert exact["identical_logits"] == 100.0 and exact["max_steps"] == 0
    saturating = agreement(name, "onnxruntime", "u8s8", limit=CONTROL_IMAGES)
    assert saturating["identical_logits"] < 90.0
