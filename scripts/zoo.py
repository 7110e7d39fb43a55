"""fxq on torchvision's and timm's CNNs: what quantizes, what runs on integers, how close.

    python -m scripts.zoo                      # torchvision's models: results/zoo.json + the README table
    python -m scripts.zoo --models resnet18 mobilenet_v2 --no-reference
    python -m scripts.zoo --joins               # concatenations: shared parameters vs requantizing
    python -m scripts.zoo --timm                # timm's CNNs (results/zoo_timm.json), deployed too

Each model has random weights with batch norm settled on the images (train-mode passes, so the
activations have realistic scales), 3×64×64 structured random images (smooth random fields plus
fine noise), 64 for calibration and 256 to score. Per model, fxq at the W8A8 defaults and, as a
reference only, torch.ao FX graph mode PTQ with the x86 default qconfig on the same data:
quantized or not, the share of executed ops on integer tensors (`fxq.graphs.runtime.count_ops`: the
dtypes each op actually saw), logits SQNR against float, top-1 agreement with float. For fxq
also: the integer graph against `fxq.simulate` (bit for bit) and save → load (identical outputs);
for timm's models, also quantized with ``requantize="onnxruntime"`` and deployed (`fxq.deploy`,
the exact weight formats): the share of logits identical to fxq's integer graph.
``--joins`` quantizes the models that concatenate twice more, each concatenation's inputs at its
own parameters (the default) and requantized to them, and writes that comparison's table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.graphs import records
from fxq.graphs.runtime import count_ops
from passes.convert import convert, convert_requantizing_joins
from scripts import readme
from scripts.evaluate import torch_ao_x86
from scripts.results import Store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "zoo.json"
JOINING = ("densenet121", "squeezenet1_0", "shufflenet_v2_x0_5", "googlenet")
MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn", "densenet121",
          "squeezenet1_0", "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_x_400mf", "googlenet", "convnext_tiny")
EXTRA_ARGUMENTS = {"googlenet": {"aux_logits": False, "init_weights": True}}
# timm's CNNs across families (ResNet-D, SE/ECA, SK, Res2Net, ResNeSt, RegNet, EfficientNet/Lite,
# MixNet, TinyNet, MNASNet, FBNet, HardCoReNAS, GhostNet, ReXNet, RepVGG, CSP, DLA, DPN, VoVNet,
# HRNet, DenseNet, LCNet, GENet, SelecSLS, Xception, ConvMixer, MobileViT, NFNet, BiT, RegNetZ,
# GCNet)
TIMM_MODELS = ("resnet50d", "seresnet50", "ecaresnet50d", "skresnet18", "res2net50_14w_8s", "resnest14d",
               "regnetx_002", "regnety_002", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0",
               "mixnet_s", "tinynet_a", "mnasnet_100", "fbnetc_100", "hardcorenas_a", "mobilenetv3_small_050",
               "ghostnet_100", "rexnet_100", "repvgg_a0", "cspresnet50", "cspdarknet53", "dla34", "dpn68",
               "ese_vovnet19b_dw", "hrnet_w18_small", "densenet121", "lcnet_050", "gernet_s", "selecsls42b",
               "xception41", "convmixer_768_32", "mobilevit_xxs", "nf_resnet26", "resnetv2_50x1_bit",
               "regnetz_b16", "gcresnet50t", "convnext_atto", "convnextv2_atto", "poolformerv2_s12", "fastvit_t8",
               "ghostnetv2_100", "resnetblur18", "mambaout_femto", "repvit_m0_9", "mobilenetv4_conv_small",
               "starnet_s1", "hgnetv2_b0", "efficientnetv2_rw_t", "edgenext_xx_small", "efficientvit_b0",
               "mobilevitv2_050", "lambda_resnet26t", "tiny_vit_5m_224", "efficientvit_m0", "csatv2", "fasternet_t0",
               "mobileone_s0", "repghostnet_050", "inception_next_tiny", "shvit_s1", "focalnet_tiny_srf")
TIMM_RESULTS = ROOT / "results" / "zoo_timm.json"
SIZE, CALIBRATION, SCORED = 64, 64, 256


def images(count: int, seed: int) -> torch.Tensor:
    """Smooth random fields (coarse noise upsampled) with a little fine noise: images with
    spatial structure, so convolutions see correlated neighbours as on photographs."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(count, 3, 8, 8, generator=g), size=SIZE, mode="bicubic", align_corners=False)
    return coarse + 0.25 * torch.randn(count, 3, SIZE, SIZE, generator=g)


def build(name: str, seed: int = 0) -> nn.Module:
    """The model with random weights and batch norm statistics settled on the images."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notes on initialization
        if name in TIMM_MODELS:
            import timm  # a dev dependency: only this study and the tests use it
            model = timm.create_model(name, pretrained=False)
        else:
            model = torchvision.models.get_model(name, weights=None, **EXTRA_ARGUMENTS.get(name, {}))
    return settled(model)


def settled(model: nn.Module, batches=None) -> nn.Module:
    """``model`` in eval mode, its batch norm statistics averaged over train-mode passes of
    ``batches`` (default: four batches of 32 `images`), so its activations have realistic scales."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the settling batches
    model.train()
    with torch.no_grad():
        for batch in batches if batches is not None else (images(32, 1000 + index) for index in range(4)):
            model(batch)
    return model.eval()


@dataclass
class Result:
    quantized: bool
    integer_share: float | None = None   # % of executed ops (with tensors, not quantize/dequantize)
    sqnr_db: float | None = None
    top1_agreement: float | None = None  # % of the scored images with the float model's class
    seconds: float | None = None
    float_ops: list | None = None        # what ran in float, by node name
    twin_exact: bool | None = None
    save_load_identical: bool | None = None
    deployed_identical: float | None = None  # % of logits the deployed model gives as fxq's graph
    deployed_same_class: float | None = None  # % of the scored images it gives fxq's class
    float_reasons: dict | None = None    # node → why it runs in float
    error: str | None = None


def score(model: nn.Module, qmodel: nn.Module, scored: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        reference, got = model(scored), qmodel(scored)
    return sqnr_db(reference, got), 100.0 * float((reference.argmax(1) == got.argmax(1)).float().mean())


def share(gm, example: torch.Tensor) -> tuple[float, list]:
    counts = count_ops(gm, example)
    return 100.0 * counts.integer / max(counts.integer + counts.float, 1), list(counts.float_ops)


def run_deployed(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor) -> Result:
    """fxq with onnxruntime's rounding, deployed with the exact weight formats: the share of the
    deployed model's logits identical to fxq's integer graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, list(calibration.split(16)), fxq.QConfig(requantize="onnxruntime"))
    deployed = fxq.deploy(qmodel, scored[:1], threads=2, weights="exact")
    with torch.no_grad():
        theirs, ours = deployed(scored), qmodel(scored)
    identical = 100.0 * float((theirs == ours).float().mean())
    same = 100.0 * float((theirs.argmax(1) == ours.argmax(1)).float().mean())
    return Result(True, deployed_identical=identical, deployed_same_class=same)


def run_fxq(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor, passes=None) -> Result:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)  # the report lists them
        qmodel = fxq.quantize(model, list(calibration.split(16)), passes=passes)
    seconds = time.perf_counter() - start
    sqnr, agreement = score(model, qmodel, scored)
    integer_share, float_ops = share(qmodel, scored[:8])
    twin = fxq.simulate(qmodel)
    with torch.no_grad():
        exact = bool(torch.equal(twin(scored), qmodel(scored)))
        with tempfile.TemporaryDirectory() as folder:
            fxq.save(qmodel, Path(folder) / "model.fxq")
            identical = bool(torch.equal(fxq.load(Path(folder) / "model.fxq")(scored), qmodel(scored)))
    reasons = {n.name: records.get(n, records.FloatOp).reason for n in qmodel.graph.nodes
               if records.has(n, records.FloatOp)}
    return Result(True, integer_share, sqnr, agreement, seconds, float_ops, exact, identical, float_reasons=reasons)


def run_torch_ao(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor) -> Result:
    start = time.perf_counter()
    qmodel = torch_ao_x86(model, [(batch, None) for batch in calibration.split(16)])
    seconds = time.perf_counter() - start
    sqnr, agreement = score(model, qmodel, scored)
    integer_share, float_ops = share(qmodel, scored[:8])
    return Result(True, integer_share, sqnr, agreement, seconds, float_ops)


def attempt(run, *args, kind: type = Result):
    """``run(*args)``, or a ``kind`` saying it failed and why."""
    try:
        return run(*args)
    except Exception as error:  # a model a quantizer cannot take is a result, not a crash
        line = traceback.format_exception_only(type(error), error)[-1].strip()
        return kind(False, error=line[:300])


def table(results: dict) -> str:
    rows = []
    for name, entry in results.items():
        ours, peer = Result(**entry["fxq"]), entry.get("torch.ao") and Result(**entry["torch.ao"])

        def cells(r: Result | None) -> list:
            if r is None:
                return ["—"] * 4
            if not r.quantized:
                return ["no", "", "", ""]
            return ["yes", f"{r.integer_share:.0f} %", f"{r.sqnr_db:.1f}", f"{r.top1_agreement:.1f} %"]

        checks = "" if not ours.quantized else ("✓" if ours.twin_exact and ours.save_load_identical else "✗")
        deployed = [] if "deployed" not in entry else [_deployed_cell(Result(**entry["deployed"]))]
        rows.append([name] + cells(ours) + [checks] + deployed + cells(peer))
    headers = ["model", "fxq", "integer ops", "SQNR dB", "top-1 agree", "twin & load exact",
               *(["deployed: identical logits (same class)"] if any("deployed" in e for e in results.values()) else []),
               "torch.ao", "integer ops", "SQNR dB", "top-1 agree"]
    return tabulate(rows, headers=headers, tablefmt="github")


def _deployed_cell(r: Result) -> str:
    if not r.quantized:
        return f"no: {r.error[:60]}"
    same = "" if r.deployed_same_class is None else f" ({r.deployed_same_class:.1f} % same class)"
    return f"{r.deployed_identical:.1f} %{same}"


def joins_table(results: dict) -> str:
    rows = []
    for name in JOINING:
        entry = results.get(name, {})
        if "joins shared" in entry:
            shared, requantized = entry["joins shared"], entry["joins requantized"]
            rows.append([name, f"{shared['sqnr_db']:.2f}", f"{requantized['sqnr_db']:.2f}",
                         f"{shared['top1_agreement']:.1f} %", f"{requantized['top1_agreement']:.1f} %"])
    return tabulate(rows, headers=["model", "SQNR dB, shared", "SQNR dB, requantized", "top-1 agree, shared",
                                   "top-1 agree, requantized"], tablefmt="github")


def compare_joins(store: Store, calibration: torch.Tensor, scored: torch.Tensor) -> None:
    for name in JOINING:
        model = build(name)
        requantizing = [convert_requantizing_joins if p is convert else p for p in fxq.PASSES]
        entry = dict(store.get(name, {}))
        for key, passes in (("joins shared", None), ("joins requantized", requantizing)):
            entry[key] = asdict(attempt(run_fxq, model, calibration, scored, passes))
        store.put(name, entry)
        print(name, json.dumps({k: entry[k] for k in ("joins shared", "joins requantized")}), flush=True)
    readme.write("zoo-joins", joins_table(store.data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS + TIMM_MODELS, help="default: every model")
    parser.add_argument("--no-reference", action="store_true", help="skip torch.ao")
    parser.add_argument("--joins", action="store_true", help="only the concatenation comparison")
    parser.add_argument("--timm", action="store_true", help="timm's CNNs instead of torchvision's")
    args = parser.parse_args()
    torch.set_num_threads(2)
    family = TIMM_MODELS if args.timm else MODELS
    store = Store(TIMM_RESULTS if args.timm else RESULTS)
    calibration, scored = images(CALIBRATION, 1), images(SCORED, 2)
    if args.joins:
        compare_joins(store, calibration, scored)
        print(joins_table(store.data))
        return
    for name in args.models or family:
        model = build(name)
        entry = dict(store.get(name, {}))
        entry["fxq"] = asdict(attempt(run_fxq, model, calibration, scored))
        if args.timm:
            entry["deployed"] = asdict(attempt(run_deployed, model, calibration, scored))
        if not args.no_reference:
            entry["torch.ao"] = asdict(attempt(run_torch_ao, model, calibration, scored))
        store.put(name, entry)
        print(name, json.dumps(entry), flush=True)
    measured = {name: store.data[name] for name in family if name in store}
    text = table(measured) + (float_list(measured) if args.timm else "")
    readme.publish("zoo-timm" if args.timm else "zoo", text)


def float_list(results: dict) -> str:
    """Each model's ops that run in float, with the reason fxq gives."""
    lines = []
    for name, entry in results.items():
        reasons = (entry["fxq"].get("float_reasons") or {}) if entry["fxq"]["quantized"] else {}
        if reasons:
            by_reason: dict[str, list[str]] = {}
            for node, reason in reasons.items():
                by_reason.setdefault(reason, []).append(node)
            lines.append(f"- {name}: " + "; ".join(f"{', '.join(nodes[:4])}{' …' if len(nodes) > 4 else ''} "
                                                  f"({len(nodes)}×): {reason}" for reason, nodes in by_reason.items()))
    return "\n\nRuns in float:\n\n" + "\n".join(lines) if lines else ""


if __name__ == "__main__":
    main()
