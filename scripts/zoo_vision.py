"""fxq on the vision models people deploy beyond classifiers: detectors, segmenters, FPN backbones,
image-to-image networks and vision transformers.

    python -m scripts.zoo_vision                       # every model: results/zoo_vision.json + README block
    python -m scripts.zoo_vision --models yolov8n unet --no-reference

Ultralytics YOLO (detection and segmentation, built from the yaml files the package ships: no
weights are downloaded), torchvision's segmentation models and a ResNet-18 FPN backbone, a UNet
and an ESPCN super-resolution net (`scripts.image_nets`), timm's vision transformers. As in
`scripts.zoo`: random weights, batch norm settled on the images, 3×64×64 structured random images
(64 calibrate, 256 score), W8A8 defaults. Per model, over every output the model returns: the
share of executed ops on integers, the worst output's SQNR against float, the integer graph
against its twin and a saved → loaded copy (bit for bit, every output), the deployed model
(``requantize="onnxruntime"``, exact weights) against fxq's graph (identical values, every
output), and torch.ao FX x86 PTQ's worst output SQNR where it quantizes the model (a reference).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.graphs import records
from fxq.graphs.outputs import named
from passes.trace import trace
from scripts import readme
from scripts.evaluate import torch_ao_x86
from scripts.results import FOLDER, Store
from scripts.zoo import CALIBRATION, SCORED, attempt, images, settled, share

RESULTS = FOLDER / "zoo_vision.json"
TRANSFORMERS = {"vit_tiny_patch16_224": {}, "deit_tiny_patch16_224": {}, "cait_xxs24_224": {},
                "swin_tiny_patch4_window7_224": {"window_size": 2}, "convit_tiny": {}, "levit_128s": {},
                "pit_ti_224": {}, "xcit_nano_12_p16_224": {}, "coat_lite_tiny": {}, "eva02_tiny_patch14_224": {}}
TORCHVISION_TRANSFORMERS = {"vit_b_16": {"image_size": 64}, "swin_t": {}}  # nn.MultiheadAttention; fx.wrap'd attention
SEGMENTERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50")
YOLO = ("yolov8n", "yolov8n-seg", "yolov8n-pose", "yolo11n", "yolo11n-obb", "yolo26n", "rtdetr-l")
MODELS = (*YOLO, *SEGMENTERS, "resnet18_fpn", "unet", "espcn", *TRANSFORMERS, *TORCHVISION_TRANSFORMERS)


def build(name: str, seed: int = 0) -> nn.Module:
    """The model with random weights and batch norm statistics settled on the images."""
    torch.manual_seed(seed)
    return settled(_made(name))


def _made(name: str) -> nn.Module:
    from scripts.image_nets import ESPCN, UNet
    if name in YOLO:
        from ultralytics.nn import tasks  # a dev dependency: only studies and tests
        heads = {"-seg": tasks.SegmentationModel, "-pose": tasks.PoseModel, "-obb": tasks.OBBModel,
                 "-l": tasks.RTDETRDetectionModel}
        kind = heads.get(name[name.rfind("-"):], tasks.DetectionModel)
        return kind(f"{name}.yaml", verbose=False)
    if name in TORCHVISION_TRANSFORMERS:
        import torchvision
        return torchvision.models.get_model(name, weights=None, **TORCHVISION_TRANSFORMERS[name])
    if name in SEGMENTERS:
        import torchvision
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21)
    if name == "resnet18_fpn":
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    if name in TRANSFORMERS:
        import timm
        return timm.create_model(name, pretrained=False, img_size=64, **TRANSFORMERS[name])
    return {"unet": UNet, "espcn": ESPCN}[name]()


@dataclass
class Result:
    quantized: bool
    integer_share: float | None = None   # % of executed ops on integers
    sqnr_db: list | None = None          # per output, against float
    outputs: list | None = None          # the outputs' names (`fxq.graphs.outputs.named`)
    seconds: float | None = None
    twin_exact: bool | None = None
    save_load_identical: bool | None = None
    deployed_identical: list | None = None  # per output: % of values the deployed model gives as fxq's graph
    deployed_sqnr_db: list | None = None    # per output: the deployed model against fxq's graph
    float_reasons: dict | None = None    # node → why it runs in float
    captured: str | None = None          # torch.ao only: quantized fxq's capture of the model, and why
    error: str | None = None


def _all_equal(a, b) -> bool:
    return all(torch.equal(x, y) for (_, x), (_, y) in zip(named(a), named(b)))


def _sqnrs(reference, approx) -> list[float]:
    return [round(sqnr_db(r, a), 2) for (_, r), (_, a) in zip(named(reference), named(approx))]


def run_fxq(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor) -> Result:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)  # the table lists them
        qmodel = fxq.quantize(model, list(calibration.split(16)))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        reference, ours = model(scored), qmodel(scored)
        exact = _all_equal(fxq.simulate(qmodel)(scored), ours)
        with tempfile.TemporaryDirectory() as folder:
            fxq.save(qmodel, Path(folder) / "model.fxq")
            identical = _all_equal(fxq.load(Path(folder) / "model.fxq")(scored), ours)
    reasons = {n.name: records.get(n, records.FloatOp).reason for n in qmodel.graph.nodes
               if records.has(n, records.FloatOp)}
    return Result(True, share(qmodel, scored[:8])[0], _sqnrs(reference, ours), [n for n, _ in named(ours)], seconds,
                  exact, identical, float_reasons=reasons)


def run_deployed(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor) -> Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, list(calibration.split(16)), fxq.QConfig(requantize="onnxruntime"))
    deployed = fxq.deploy(qmodel, scored[:1], threads=2, weights="exact")
    with torch.no_grad():
        theirs, ours = named(deployed(scored)), named(qmodel(scored))
    identical = [round(100.0 * float((a == b).float().mean()), 2) for (_, a), (_, b) in zip(theirs, ours)]
    return Result(True, deployed_identical=identical, deployed_sqnr_db=_sqnrs(dict(ours), dict(theirs)))


def run_torch_ao(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor) -> Result:
    """torch.ao FX on the model; where torch.fx cannot trace it (Ultralytics' forward), on fxq's
    own capture of it (`passes.trace`: the same float function as one traceable graph), said so."""
    batches = [(batch, None) for batch in calibration.split(16)]
    try:
        qmodel, given = torch_ao_x86(model, batches), None
    except Exception as error:  # torch.ao's own tracer failed: hand it what fxq captured
        captured = trace(model, fxq.PassContext(fxq.QConfig(), list(calibration.split(16))))
        qmodel, given = torch_ao_x86(captured, batches), f"fxq's capture ({type(error).__name__} on the model)"
    with torch.no_grad():
        reference, theirs = model(scored), qmodel(scored)
    return Result(True, share(qmodel, scored[:8])[0], _sqnrs(reference, theirs), captured=given)


def table(results: dict) -> str:
    rows = []
    for name, entry in results.items():
        ours, deployed, peer = (Result(**entry[k]) if entry.get(k) else None for k in ("fxq", "deployed", "torch.ao"))
        if not ours.quantized:
            rows.append([name, f"no: {ours.error[:80]}"] + [""] * 7)
            continue
        compared = peer is not None and peer.quantized
        margin = f"{min(a - b for a, b in zip(ours.sqnr_db, peer.sqnr_db)):+.1f}" if compared else ""
        rows.append([name, len(ours.sqnr_db), f"{ours.integer_share:.0f} %", f"{min(ours.sqnr_db):.1f}",
                     "✓" if ours.twin_exact and ours.save_load_identical else "✗", _deployed_cell(deployed),
                     f"{peer.integer_share:.0f} %" + "¹" * bool(peer.captured) if compared
                     else "no" if peer is not None else "not run",
                     f"{min(peer.sqnr_db):.1f}" if compared else "", margin])
    headers = ["model", "outputs", "fxq integer ops", "worst output SQNR dB", "twin & load exact (every output)",
               "deployed: identical values (worst output)", "torch.ao integer ops", "torch.ao worst SQNR dB",
               "fxq − torch.ao, worst output dB"]
    return tabulate(rows, headers=headers, tablefmt="github")


def _deployed_cell(r: Result | None) -> str:
    if r is None:
        return ""
    if not r.quantized:
        return f"no: {r.error[:60]}"
    return f"{min(r.deployed_identical):.1f} % (SQNR {min(r.deployed_sqnr_db):.0f} dB)" \
        if min(r.deployed_identical) < 100 else "100.0 %"


def float_list(results: dict) -> str:
    """Each model's ops that run in float, with the reason fxq gives."""
    lines = [f"- {name}: " + "; ".join(f"{node}: {why}" for node, why in list(reasons.items())[:4])
             for name, entry in results.items()
             if (reasons := (entry["fxq"].get("float_reasons") or {}) if entry["fxq"]["quantized"] else {})]
    captured = "\n\n¹ torch.fx cannot trace the model for torch.ao: torch.ao quantized fxq's capture of it instead." \
        if any((e.get("torch.ao") or {}).get("captured") for e in results.values()) else ""
    return captured + ("\n\nRuns in float:\n\n" + "\n".join(lines) if lines else
                       "\n\nEvery op of every model runs on integers.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: every model")
    parser.add_argument("--no-reference", action="store_true", help="skip torch.ao")
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = Store(RESULTS)
    calibration, scored = images(CALIBRATION, 1), images(SCORED, 2)
    for name in args.models or MODELS:
        model = build(name)
        entry = {"fxq": asdict(attempt(run_fxq, model, calibration, scored, kind=Result)),
                 "deployed": asdict(attempt(run_deployed, model, calibration, scored, kind=Result)),
                 "machine": readme.machine(2)}
        if not args.no_reference:
            entry["torch.ao"] = asdict(attempt(run_torch_ao, model, calibration, scored, kind=Result))
        store.put(name, entry)
        print(name, json.dumps({k: {f: v for f, v in e.items() if f != "float_reasons"} for k, e in entry.items()}),
              flush=True)
    publish(store)


def publish(store: Store) -> None:
    """The README block from every model's stored results."""
    measured = {name: store.data[name] for name in MODELS if name in store}
    cpus = sorted({f"{e['machine']['cpu']} (torch capability {e['machine']['capability']})" for e in measured.values()})
    readme.publish("zoo-vision", f"Measured on {', '.join(cpus)}, torch {torch.__version__}, 2 threads.\n\n"
                   + table(measured) + float_list(measured))


if __name__ == "__main__":
    main()
