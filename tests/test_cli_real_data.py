"""Every subcommand of the installed `fxq` command, run as a subprocess on the real MNIST ResNet-18."""
import pytest

import fxq
from fxq.analysis.comparison import integer_layers
from tests.helpers import images_shown, run_fxq

pytestmark = pytest.mark.real_data
MNIST = ["--model", "scripts.models:resnet18_28x28", "--weights", "checkpoints/resnet18_mnist.pt", "--data", "mnist"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """`fxq quantize` on MNIST: the .fxq file and what the command printed."""
    path = tmp_path_factory.mktemp("cli") / "mnist.fxq"
    done = run_fxq("quantize", *MNIST, "--calib", "256", "--out", str(path))
    assert done.returncode == 0, done.stderr
    return path, done


def test_quantize_writes_a_model_that_loads_and_says_what_it_did(quantized):
    path, done = quantized
    assert "48 of 48 ops run on integers" in done.stdout and f"wrote {path}" in done.stdout
    assert "on 256 mnist images: W8A8 per-channel" in done.stdout
    assert "calibration images" in done.stderr and "img/s" in done.stderr
    assert len(integer_layers(fxq.load(path))) == 21


def test_evaluate_prints_float_fxq_and_deployed_in_one_table(quantized):
    done = run_fxq("evaluate", str(quantized[0]), *MNIST, "--limit", "2000", "--runs", "5", "--quiet")
    assert done.returncode == 0, done.stderr
    rows = {line.split("  ")[0]: line.split() for line in done.stdout.splitlines()[2:]}
    # quantized with the defaults, so in onnxruntime's arithmetic: the deployed row is the executor's, exactly
    assert set(rows) == {"float32", "fxq (integer executor)", "fxq deployed (onnxruntime, bit-exact)"}
    accuracy = {name: float(next(v for v in row if "." in v and v.replace(".", "").isdigit()))
                for name, row in rows.items()}
    assert accuracy["float32"] > 99.0 and all(abs(a - accuracy["float32"]) <= 0.3 for a in accuracy.values())
    assert accuracy["fxq deployed (onnxruntime, bit-exact)"] == accuracy["fxq (integer executor)"]


def test_explain_one_layer_checks_its_formula_on_test_images(quantized):
    done = run_fxq("explain", str(quantized[0]), "layer2.0.conv1", "--data", "mnist", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "formula vs executed graph on the batch: exact match" in done.stdout
    whole = run_fxq("explain", str(quantized[0]), "--markdown")
    assert whole.returncode == 0 and "| layer4.1.conv2 " in whole.stdout


def test_dump_graph_after_a_chosen_pass(tmp_path):
    done = run_fxq("dump-graph", *MNIST, "--after", "fold_bn", "--calib", "64", "--quiet",
                   "--graphml", str(tmp_path / "g.graphml"), "--dot", str(tmp_path / "g.dot"))
    assert done.returncode == 0, done.stderr
    assert "after fold_bn" in done.stdout and "layer4.1.conv2" in done.stdout and "bn1" not in done.stdout
    assert (tmp_path / "g.graphml").exists() and (tmp_path / "g.dot").read_text().startswith("digraph")


def test_search_bits_writes_a_config_that_quantize_uses(tmp_path):
    config = tmp_path / "bits.toml"
    done = run_fxq("search-bits", *MNIST, "--avg-bits", "6", "--candidates", "4,8", "--calib", "128",
                   "--eval", "500", "--weight-range", "minmax", "--out-config", str(config),
                   "--plot", str(tmp_path / "bits.png"))
    assert done.returncode == 0, done.stderr
    assert "avg weight bits" in done.stdout and "chosen for 6 bits" in done.stdout
    assert "error of each layer (measured at 4 and 8 bits)" in done.stderr  # the search's own progress
    assert (tmp_path / "bits.png").stat().st_size > 1000
    out = tmp_path / "mixed.fxq"
    done = run_fxq("quantize", *MNIST, "--config", str(config), "--calib", "128", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    widths = {row[0]: row[5] for row in fxq.explain(fxq.load(out)).rows if row[0] in integer_layers(fxq.load(out))}
    assert set(widths.values()) == {4, 8} and "keep_first_last_8bit = false" in config.read_text()


def test_report_renders_with_its_plots_in_a_browser(quantized, tmp_path):
    done = run_fxq("report", str(quantized[0]), *MNIST, "--out", str(tmp_path / "report"), "--limit", "1000",
                   "--sensitivity-images", "300", "--runs", "5")
    assert done.returncode == 0, done.stderr
    assert "sensitivity, layer by layer" in done.stderr
    total, decoded = images_shown(tmp_path / "report" / "index.html")
    assert total == 2 + 3 * 2 + 1 and decoded == total
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| layer4.1.conv2 " in markdown and "SQNR dB isolated" in markdown and "![" in markdown
