"""timm's CNNs, as a user takes them (no overrides): on integers, saved and loaded exactly,
deployed with fxq's very logits, and at least as close to the float model as torch.ao
(`scripts/zoo.py --timm` measures all of them; these are one per family of layers fxq had to
learn: batch norm + activation modules, "same" padding, selective kernels, split attention, ECA,
upsampling branches, layer norms, gates resized to another tensor's shape, attention blocks,
bilinear resampling with channel extrema and gathered positions, padding with ones)."""
import pytest

from scripts import zoo

pytestmark = pytest.mark.real_data

MODELS = ("regnety_002", "tf_efficientnet_b0", "skresnet18", "resnest14d", "ecaresnet50d", "hrnet_w18_small",
          "lcnet_050", "convnext_atto", "ghostnetv2_100", "mobilevit_xxs", "csatv2", "efficientvit_b0")


def _data():
    return zoo.images(zoo.CALIBRATION, 1), zoo.images(64, 2)


@pytest.mark.parametrize("name", MODELS)
def test_a_timm_cnn_quantizes_whole_saves_and_deploys_exactly(name):
    pytest.importorskip("timm")  # here, not at import: the unit loop collects this file without timm
    model = zoo.build(name)
    calibration, scored = _data()
    ours = zoo.run_fxq(model, calibration, scored)
    assert ours.twin_exact and ours.save_load_identical
    assert ours.integer_share == 100.0, ours.float_reasons
    assert zoo.run_deployed(model, calibration, scored).deployed_identical == 100.0


@pytest.mark.parametrize("name", ["regnety_002", "skresnet18", "hrnet_w18_small", "resnest14d"])
def test_sqnr_is_at_least_torch_aos_less_half_a_db(name):
    pytest.importorskip("timm")
    model = zoo.build(name)
    calibration, scored = _data()
    ours, theirs = zoo.run_fxq(model, calibration, scored), zoo.run_torch_ao(model, calibration, scored)
    assert ours.sqnr_db >= theirs.sqnr_db - 0.5
