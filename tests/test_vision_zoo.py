"""The vision models people deploy beyond classifiers, as a user takes them (no overrides): on
integers, every output saved and loaded exactly, deployed with fxq's very values, and at least as
close to the float model as torch.ao on every output where torch.ao quantizes the model
(`scripts/zoo_vision.py` measures all of them; these are one per family: a YOLO detector with its
anchor grid and split C2f blocks, a UNet's transposed convs, ESPCN's pixel shuffle, an FPN's dict
of feature maps, a ViT's class token, Swin's shifted windows)."""
import pytest

from scripts import zoo, zoo_vision

pytestmark = pytest.mark.real_data
MODELS = ("yolov8n", "unet", "espcn", "resnet18_fpn", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224")


def _data():
    return zoo.images(zoo.CALIBRATION, 1), zoo.images(64, 2)


@pytest.mark.parametrize("name", MODELS)
def test_a_deployed_vision_model_quantizes_whole_saves_and_deploys_exactly(name):
    if name.startswith("yolo"):
        pytest.importorskip("ultralytics")
    if "_patch" in name:
        pytest.importorskip("timm")
    model = zoo_vision.build(name)
    calibration, scored = _data()
    ours = zoo_vision.run_fxq(model, calibration, scored)
    assert ours.twin_exact and ours.save_load_identical
    assert ours.integer_share == 100.0, ours.float_reasons
    deployed = zoo_vision.run_deployed(model, calibration, scored)
    assert deployed.deployed_identical == [100.0] * len(ours.outputs)


@pytest.mark.parametrize("name", ["unet", "resnet18_fpn"])
def test_every_output_is_at_least_as_close_as_torch_aos_less_half_a_db(name):
    model = zoo_vision.build(name)
    calibration, scored = _data()
    ours, theirs = zoo_vision.run_fxq(model, calibration, scored), zoo_vision.run_torch_ao(model, calibration, scored)
    assert len(ours.sqnr_db) == len(theirs.sqnr_db)
    assert all(a >= b - 0.5 for a, b in zip(ours.sqnr_db, theirs.sqnr_db)), (ours.sqnr_db, theirs.sqnr_db)
