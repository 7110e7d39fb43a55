"""The `fxq` command on a user's own model (PKG.MODULE:FACTORY in a file of a temporary folder) and
an image folder: every subcommand, errors and exit codes, the config file, the report in a browser."""
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fxq
from fxq.cli import inputs
from fxq.cli.main import EXAMPLES, main
from fxq.cli.usage import UsageError
from tests.helpers import images_shown, run_fxq

NET = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


    class Segmenter(nn.Module):
        """Per-pixel scores for 2 classes, as torchvision's segmentation models return them."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.out, self.aux = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            features = self.body(x)
            return {"out": self.out(features), "aux": self.aux(features)}


    def segmenter():
        torch.manual_seed(0)
        return Segmenter()


    class Moody(nn.Module):
        """Control flow on the values: no graph can hold it."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else self.conv(-x)
''')


def _images(folder, count: int, seed: int, classes=("c0", "c1")) -> None:
    """Classes of 12×12 grayscale PNGs: the first with a bright top half, the others bottom."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 60, (12, 12))
            pixels[:6] += 180 if label == 0 else 0
            pixels[6:] += 180 if label != 0 else 0
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's folder: their network in tinynet.py, its trained weights, train/ and test/ images."""
    root = tmp_path_factory.mktemp("project")
    (root / "tinynet.py").write_text(NET)
    sys.path.insert(0, str(root))
    try:
        import tinynet
        torch.manual_seed(0)
        model = tinynet.build()
    finally:
        sys.path.remove(str(root))
    _images(root / "digits" / "train", 24, seed=0)
    _images(root / "digits" / "test", 16, seed=1)
    batches = list(inputs.load_data(str(root / "digits"), channels=1).calibration(48).batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):  # a few steps: the classes are easy
        for images, labels in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    torch.save(model.eval().state_dict(), root / "tinynet.pt")
    torch.save(tinynet.segmenter().state_dict(), root / "segmenter.pt")
    return root


MODEL = ["--model", "tinynet:build", "--weights", "tinynet.pt", "--data", "digits"]


@pytest.mark.real_data  # processes of their own: left to `make test`
def test_a_users_own_model_quantizes_evaluates_and_reports_from_the_command_line(project):
    done = run_fxq("quantize", *MODEL, "--out", "tiny.fxq", "--calib", "32", "--quiet", cwd=project)
    assert done.returncode == 0, done.stderr
    assert "ops run on integers" in done.stdout and "wrote tiny.fxq" in done.stdout
    assert done.stderr == ""  # --quiet: no progress bars
    assert fxq.load(project / "tiny.fxq")(torch.zeros(1, 1, 12, 12)).shape == (1, 2)

    done = run_fxq("evaluate", "tiny.fxq", *MODEL, "--runs", "2", cwd=project)
    assert done.returncode == 0, done.stderr
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    assert {"float32", "fxq (integer executor)"} <= set(rows) and any(k.startswith("fxq deployed") for k in rows)
    assert "img/s" in done.stderr  # progress bars with throughput

    done = run_fxq("report", "tiny.fxq", *MODEL, "--out", "report", "--runs", "2", "--worst", "2", cwd=project)
    assert done.returncode == 0, done.stderr
    page = project / "report" / "index.html"
    total, decoded = images_shown(page)
    assert total == 2 + 2 * 2 + 1 and decoded == total  # summary, SQNR, 2 × (weights, activations), sensitivity
    markdown = (project / "report" / "report.md").read_text()
    for heading in ("Float vs quantized", "Every op", "The worst layers", "Sensitivity", "What runs in float",
                    "The config"):
        assert f"## {heading}" in markdown
    assert "Nothing: every op of the model runs on integers." in markdown
    assert "The 2 layers that lose the most when quantized alone" in markdown  # ranked by measured sensitivity
    assert re.search(r"\| weight_bits +\| 8 +\| default +\|", markdown)  # nothing was set: nothing marked so


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"fxq {command} " in out


@pytest.mark.real_data  # the installed command, in a process of its own
def test_the_installed_command_runs_and_a_usage_error_exits_2():
    command = [sys.executable, "-m", "fxq.cli.main", "quantize", "--model", "resnet18"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "the following arguments are required: --data, --out" in done.stderr


def test_errors_are_one_line_with_the_fix_and_exit_1_or_2(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    cases = [  # (arguments, exit code, part of the message)
        (["quantize", "--model", "no_such_model", "--data", "digits", "--out", "x.fxq"], 2, "not a torchvision"),
        (["quantize", "--model", "tinynet:nothing", "--data", "digits", "--out", "x.fxq"], 2, "has no 'nothing'"),
        (["quantize", "--model", "resnet18", "--weights", "tinynet.pt", "--data", "digits", "--out", "x.fxq"], 2,
         "does not fit the model"),
        (["quantize", *MODEL, "--data", "nowhere", "--out", "x.fxq"], 2, "neither mnist"),
        (["explain", "missing.fxq"], 2, "no such file; write one with `fxq quantize"),
        (["quantize", "--model", "tinynet:build", "--weights", "missing.pt", "--data", "digits", "--out", "x.fxq"],
         2, "--weights missing.pt: no such file"),
        (["quantize", *MODEL, "--calib", "0", "--out", "x.fxq"], 2, "calibrate on at least one image"),
        (["quantize", *MODEL, "--config", "missing.toml", "--out", "x.fxq"], 2, "--config missing.toml: no such file"),
        (["quantize", "--model", "tinynet:Moody", "--data", "digits", "--out", "x.fxq"], 1, "cannot trace"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert message in last and last.startswith(f"fxq {argv[0]}: error:"), err
        assert "Traceback" not in err
    (project / "damaged.pt").write_bytes(b"not a checkpoint")
    assert main(["quantize", *MODEL[:2], "--weights", "damaged.pt", *MODEL[4:], "--out", "x.fxq"]) == 2
    assert "is not a PyTorch state dict" in capsys.readouterr().err  # a file named that cannot be used


def test_global_options_work_before_or_after_the_command(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    for argv in (["--quiet", "quantize", *MODEL], ["quantize", *MODEL, "--quiet"]):
        assert main([*argv, "--calib", "16", "--out", "g.fxq"]) == 0
        assert capsys.readouterr().err == ""  # quiet: no progress bars
    for argv in (["--debug", "quantize", *MODEL], ["quantize", *MODEL, "--debug"]):
        with pytest.raises(UsageError, match="calibrate on at least one image"):  # --debug: the real exception
            main([*argv, "--calib", "0", "--out", "x.fxq"])


def test_a_value_refused_in_the_config_file_exits_2_as_the_same_flag_does(project, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(project)
    (tmp_path / "c.toml").write_text('act_range = "median"\n')
    assert main(["quantize", *MODEL, "--config", str(tmp_path / "c.toml"), "--out", "x.fxq"]) == 2
    assert "median" in capsys.readouterr().err
    with pytest.raises(SystemExit) as flag:
        main(["quantize", *MODEL, "--act-range", "median", "--out", "x.fxq"])
    assert flag.value.code == 2


def test_help_and_version_answer_without_importing_torch():
    code = ("import sys, contextlib, io\n"
            "from fxq.cli.main import main\n"
            "for argv in (['--help'], ['--version'], ['quantize', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
    done = subprocess.run([sys.executable, "-m", "fxq.cli.main", "--version"], capture_output=True, text=True)
    assert re.fullmatch(r"fxq \d+\.\d+\.\d+\n", done.stdout), done.stdout


def test_the_commands_pass_names_are_the_pipelines():
    from passes import ORDER
    assert ORDER == tuple(p.__name__ for p in fxq.PASSES)


@pytest.mark.real_data  # a whole report with its plots: left to `make test`
def test_a_model_returning_a_dict_evaluates_and_reports_its_outputs_against_float(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    model = ["--model", "tinynet:segmenter", "--weights", "segmenter.pt", "--data", "digits"]
    assert main(["quantize", *model, "--out", "seg.fxq", "--calib", "16", "--quiet"]) == 0
    assert set(fxq.load(project / "seg.fxq")(torch.zeros(1, 1, 12, 12))) == {"out", "aux"}
    assert main(["evaluate", "seg.fxq", *model, "--runs", "1", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "no classifier logits" in shown and "worst output SQNR dB" in shown and "accuracy %" not in shown
    rows = {line.split("  ")[0]: line.split() for line in shown.splitlines()}
    deployed = next(row for name, row in rows.items() if name.startswith("fxq deployed"))
    assert float(rows["fxq (integer executor)"][3]) > 20  # worst output SQNR, dB
    assert main(["report", "seg.fxq", *model, "--out", "seg_report", "--runs", "1", "--worst", "1", "--quiet"]) == 0
    markdown = (project / "seg_report" / "report.md").read_text()
    assert "same class as float" in markdown and deployed


def test_a_train_folder_without_a_test_split_does_both_and_says_so(project, tmp_path):
    _images(tmp_path / "only" / "train", 4, seed=2)
    data = inputs.load_data(str(tmp_path / "only"), channels=1)
    assert data.class_names() == ["c0", "c1"]  # never a class named "train"
    assert data.calibration_split is data.evaluation_split
    assert "has train/ but not a test/ (or val/) folder" in data.note and "calibration images" in data.note


def test_split_folders_beside_class_folders_are_refused(project, monkeypatch, capsys, tmp_path):
    _images(tmp_path / "mixed" / "train", 2, seed=3)
    _images(tmp_path / "mixed", 2, seed=4)  # c0/, c1/ beside train/
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL[:4], "--data", str(tmp_path / "mixed"), "--out", "x.fxq", "--quiet"]) == 2
    assert "split folders (train/) beside class folders (c0/, c1/...)" in capsys.readouterr().err


def test_a_test_split_missing_a_class_keeps_the_training_labels(tmp_path):
    _images(tmp_path / "d" / "train", 2, seed=5)
    _images(tmp_path / "d" / "test", 2, seed=6, classes=["c1"])  # ImageFolder alone would label c1 as 0
    data = inputs.load_data(str(tmp_path / "d"), channels=1)
    assert data.labels().tolist() == [1, 1] and data.class_names() == ["c0", "c1"]
    assert [label for _, label in data.evaluation(shard=False).batches][0].tolist() == [1, 1]
    _images(tmp_path / "d" / "test", 1, seed=7, classes=["c2"])
    with pytest.raises(inputs.UsageError, match=r"test/ has classes train/ has not \(c2\)"):
        inputs.load_data(str(tmp_path / "d"), channels=1)


def test_data_with_more_classes_than_the_model_has_outputs_is_refused(project, monkeypatch, capsys, tmp_path):
    _images(tmp_path / "three" / "train", 2, seed=8, classes=["c0", "c1", "c2"])
    _images(tmp_path / "three" / "test", 2, seed=9, classes=["c0", "c1", "c2"])
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL, "--out", "k.fxq", "--calib", "16", "--quiet"]) == 0
    assert main(["evaluate", "k.fxq", *MODEL[:4], "--data", str(tmp_path / "three"), "--no-deploy", "--quiet"]) == 2
    assert "has 3 classes but the model gives 2 outputs: images of c2 can never be predicted" in capsys.readouterr().err


def test_a_float_row_that_is_not_the_quantized_model_is_flagged_not_compared(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL, "--out", "f.fxq", "--calib", "16", "--quiet"]) == 0
    capsys.readouterr()
    torch.manual_seed(1)  # tinynet:build without its weights: a differently initialized network
    assert main(["evaluate", "f.fxq", "--model", "tinynet:build", "--data", "digits", "--no-deploy", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "its weights are unlike the integer model's (median correlation" in shown
    assert _column(shown, "vs float (points)") == ["", "—"] and _column(shown, "× float size") == ["", "—"]
    assert main(["evaluate", "f.fxq", "--model", "tinynet:segmenter", "--data", "digits", "--no-deploy",
                 "--quiet"]) == 0
    assert "it has no layer of the integer model's shape at" in capsys.readouterr().out
    assert main(["evaluate", "f.fxq", *MODEL, "--no-deploy", "--quiet"]) == 0  # its own float model: compared
    shown = capsys.readouterr().out
    assert "no reference" not in shown and _column(shown, "vs float (points)")[1] not in ("", "—")


def test_evaluate_shows_a_deployed_row_per_runtime_asked_for(project, monkeypatch, capsys):
    pytest.importorskip("openvino")
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL, "--out", "r.fxq", "--calib", "16", "--requantize", "onnxruntime", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "r.fxq", *MODEL, "--runtime", "openvino", "--runtime", "onnxruntime", "--runs", "1",
                 "--quiet"]) == 0
    rows = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("fxq deployed")]
    assert rows == ["fxq deployed (openvino, within a few steps)", "fxq deployed (onnxruntime, bit-exact)"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert main(["evaluate", "r.fxq", *MODEL, "--runtime", "openvino", "--runs", "1", "--quiet"]) == 2
    assert "--runtime openvino: openvino is not installed (pip install 'fxq[openvino]')" in capsys.readouterr().err


def test_a_float_model_at_chance_is_no_reference(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    torch.manual_seed(2)  # an untrained network, quantized and evaluated as it is
    assert main(["quantize", "--model", "tinynet:build", "--data", "digits", "--out", "u.fxq", "--quiet"]) == 0
    torch.manual_seed(2)
    assert main(["evaluate", "u.fxq", "--model", "tinynet:build", "--data", "digits", "--no-deploy", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "is at chance (the commonest class is 50.0 % of the images)" in shown
    assert _column(shown, "vs float (points)")[1] == "—"


def test_images_of_different_sizes_ask_for_a_size(project, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(project)
    for label, size in ((0, 12), (1, 16)):
        (tmp_path / "mixed" / f"c{label}").mkdir(parents=True)
        pixels = np.random.default_rng(label).integers(0, 255, (size, size)).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "mixed" / f"c{label}" / "a.png")
    argv = ["quantize", "--model", "tinynet:build", "--data", str(tmp_path / "mixed"), "--out", "m.fxq", "--quiet"]
    assert main(argv) == 2
    assert "differ in size; give --image-size H or HxW" in capsys.readouterr().err
    assert main(argv + ["--image-size", "12"]) == 0


def test_a_damaged_model_file_is_refused_in_one_line(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    (project / "bad.fxq").write_bytes(b"not a model")
    assert main(["explain", "bad.fxq"]) == 2
    assert "is not a valid fxq model file" in capsys.readouterr().err


def test_explain_names_the_layers_to_choose_from(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL, "--out", "e.fxq", "--calib", "16", "--quiet"]) == 0
    assert main(["explain", "e.fxq", "nope"]) == 2
    assert "choose one of ['0', '3', '7']" in capsys.readouterr().err
    assert main(["explain", "e.fxq", "3", "--data", "digits", "--quiet"]) == 0
    assert "exact match" in capsys.readouterr().out


def test_config_file_and_flags_set_the_qconfig_and_overrides(project, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(project)
    config = tmp_path / "c.toml"
    config.write_text('act_range = "percentile"\nweight_bits = 6\n'
                      '[overrides]\n"7" = "float"\n"3" = { weight_bits = 4 }\n')
    assert main(["quantize", *MODEL, "--config", str(config), "--a-bits", "6", "--out", "c.fxq", "--quiet"]) == 0
    qmodel = fxq.load(project / "c.fxq")
    chosen = fxq.explain(qmodel)
    weight_bits = {row[0]: row[5] for row in chosen.rows if row[1].startswith("QConv")}
    assert weight_bits == {"0": 8, "3": 4}  # the first layer stays at 8 bits below 8 bits, by default
    assert "W6A6 per-channel, weights output_aware, activations percentile" in capsys.readouterr().out
    assert "float: kept in float by overrides" in {row[0]: row[-1] for row in chosen.rows}["7"]
    config.write_text("wieght_bits = 4\n")
    assert main(["quantize", *MODEL, "--config", str(config), "--out", "c.fxq"]) == 2
    assert "unknown QConfig field(s) ['wieght_bits']" in capsys.readouterr().err


def test_pair_safe_quantizes_7_bit_weights_beside_8_bit_activations(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL, "--pair-safe", "--out", "p.fxq", "--quiet"]) == 0
    assert "pair-safe 7-bit weights" in capsys.readouterr().out
    rows = fxq.explain(fxq.load(project / "p.fxq")).rows
    assert {row[5] for row in rows if row[1].startswith("QConv")} == {7}


def test_a_written_config_reads_back_as_the_same_configs(tmp_path):
    base = fxq.QConfig(act_range="mse", keep_first_last_8bit=False)
    overrides = {"layer1.*": base.with_bits(weight_bits=4), "fc": None, "conv1": base.replace(placement="post")}
    inputs.write_config(tmp_path / "c.toml", base, overrides)
    config, read = inputs.make_config(*inputs.read_config(tmp_path / "c.toml"))
    assert config == base and read == overrides
    assert read["layer1.*"].weight_range == "output_aware"  # left to the 4-bit defaults, as written


def test_quiet_silences_the_progress_bars_only(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL, "--out", "q.fxq", "--calib", "16"]) == 0
    loud = capsys.readouterr()
    assert "calibration images" in loud.err and "img/s" in loud.err
    assert main(["quantize", *MODEL, "--out", "q.fxq", "--calib", "16", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out.splitlines()[-1] == loud.out.splitlines()[-1]


@pytest.mark.real_data  # processes of their own: left to `make test`
def test_the_command_runs_unchanged_under_torchrun_and_gives_the_single_process_model(project, monkeypatch, capsys):
    run = lambda *args: _torchrun(project, *args)  # noqa: E731
    done = run("quantize", *MODEL, "--out", "two.fxq", "--calib", "40", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote two.fxq") == 1  # rank 0 speaks and writes
    together = run("evaluate", "two.fxq", *MODEL, "--runs", "2", "--no-deploy", "--quiet")
    assert together.returncode == 0, together.stderr
    monkeypatch.chdir(project)
    assert main(["quantize", *MODEL, "--out", "single.fxq", "--calib", "40", "--quiet"]) == 0
    single, two = fxq.load(project / "single.fxq"), fxq.load(project / "two.fxq")
    for key, value in single.state_dict().items():
        assert torch.equal(value, two.state_dict()[key]), key
    capsys.readouterr()
    assert main(["evaluate", "single.fxq", *MODEL, "--runs", "2", "--no-deploy", "--quiet"]) == 0
    alone = capsys.readouterr().out
    assert _column(together.stdout, "accuracy %") == _column(alone, "accuracy %")
    assert len(_column(alone, "accuracy %")) == 2


@pytest.mark.real_data  # processes of their own: left to `make test`
def test_report_and_bit_search_run_under_torchrun(project):
    run = lambda *args: _torchrun(project, *args)  # noqa: E731
    done = run("quantize", *MODEL, "--out", "r.fxq", "--calib", "32", "--quiet")
    assert done.returncode == 0, done.stderr
    done = run("report", "r.fxq", *MODEL, "--out", "report2", "--runs", "2", "--worst", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote report2/index.html") == 1
    assert "On 32 test images" in (project / "report2" / "report.md").read_text()  # both ranks' shards
    done = run("search-bits", *MODEL, "--avg-bits", "6", "--candidates", "4,8", "--calib", "16", "--eval", "16",
               "--out-config", "b.toml", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("chosen for 6 bits") == 1 and (project / "b.toml").exists()


def _torchrun(folder, *args: str) -> subprocess.CompletedProcess:
    """The installed command on 2 processes of one machine, as a user starts it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(sys.executable).parent / "fxq"), *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)


def _column(table: str, header: str) -> list[str]:
    """The cells under ``header`` of a tabulate "simple" table (its dashes mark the columns)."""
    lines = table.splitlines()
    dashes = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans = [m.span() for m in re.finditer(r"-+", lines[dashes])]
    index = next(i for i, (a, b) in enumerate(spans) if lines[dashes - 1][a:b].strip() == header)
    a, b = spans[index]
    return [line[a:b].strip() for line in lines[dashes + 1:] if line.strip() and not line.startswith("(")]
