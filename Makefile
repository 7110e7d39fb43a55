# Two commands on a fresh machine:  `make demo` (quantize, print the results table) and `make test`.
PY := .venv/bin/python
FASHION := /usr/share/datasets/fashion-mnist
APT_LOG := /tmp/fxq-apt.log

.PHONY: setup demo test data docs browser emulator report

setup: .venv/ready data browser emulator

# torch/torchvision are pinned to the CPU-usable wheels this machine serves from local files.
# Installers' output goes to .venv/setup.log, shown only if a step fails.
.venv/ready: pyproject.toml
	@python3 -m venv .venv
	@{ .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 && .venv/bin/pip install -e '.[dev,deploy,openvino]'; } \
		> .venv/setup.log 2>&1 || { cat .venv/setup.log; exit 1; }
	@touch $@

data: .venv/ready
	@test -d $(FASHION) || { apt-get update && apt-get install -y dataset-fashion-mnist; } > $(APT_LOG) 2>&1 \
		|| { cat $(APT_LOG); exit 1; }
	@$(PY) -c "from scripts import data; data.load('mnist', 'test'); data.load('fashion', 'test')"

# tests/test_deploy_real_data.py runs onnxruntime as an AVX2-only CPU does, under QEMU's user-mode
# emulation (Debian's qemu-user), whatever this machine's CPU
emulator:
	@command -v qemu-x86_64 >/dev/null || [ "$$(uname -m)" != x86_64 ] || \
		{ apt-get update && apt-get install -y qemu-user; } > $(APT_LOG) 2>&1 || { cat $(APT_LOG); exit 1; }

# The report test renders `fxq report`'s page in a headless Chromium (Debian's build, as root).
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
		{ apt-get update && apt-get install -y chromium-headless-shell; } > $(APT_LOG) 2>&1 || { cat $(APT_LOG); exit 1; }

# The results table as a user makes it: `fxq quantize`, then `fxq evaluate` (float, fxq's integer
# graph, and the deployed onnxruntime model, bit-exact with it), on both data sets. The README's
# table, with torch.ao's PTQ beside it: `python -m scripts.evaluate --reference --readme`.
demo: .venv/ready data
	@export FXQ_DATA=$(CURDIR)/data; for set in mnist:mnist fashion:fashion-mnist; do \
		name=$${set%%:*}; net="--model scripts.models:resnet18_28x28 --weights checkpoints/resnet18_$$name.pt"; \
		echo; echo "$${set#*:}: ResNet-18 at W8A8, 512 calibration images, the full test set"; \
		.venv/bin/fxq quantize $$net --data $${set#*:} --out results/$$name.fxq --quiet >/dev/null \
			&& .venv/bin/fxq evaluate results/$$name.fxq $$net --data $${set#*:} --threads 2 || exit 1; \
	done

test: setup
	$(PY) -m ruff check fxq passes scripts tests
	$(PY) -m pytest -q

# Every results table of the README (each between <!-- name:start/end --> markers) and
# docs/ranges.md, docs/explain.md and docs/low_bits.md with their plots; sweeps are cached in
# results/. Hours on 2 cores: the zoo, the benchmarks, and the emulated AVX2 deploy rows.
docs: setup
	$(PY) -m scripts.evaluate --reference --readme
	$(PY) -m scripts.zoo
	$(PY) -m scripts.zoo --joins
	$(PY) -m scripts.zoo_vision
	$(PY) -m scripts.branched
	$(PY) -m scripts.deploy_agreement
	$(PY) -m scripts.deploy_runtimes
	$(PY) -m scripts.bench
	$(PY) -m scripts.bench_backends
	$(PY) -m scripts.bench_cli
	$(PY) -m scripts.file_sizes
	$(PY) -m scripts.pair_safe
	$(PY) -m scripts.sensitivity --dataset mnist
	$(PY) -m scripts.sensitivity --dataset fashion
	$(PY) -m scripts.ranges_report
	$(PY) -m scripts.explain_report
	$(PY) -m scripts.low_bits
	$(PY) -m scripts.low_bits_report
	$(PY) -m scripts.model_suite
	$(MAKE) report

FASHION_NET := --model scripts.models:resnet18_28x28 --weights checkpoints/resnet18_fashion.pt --data fashion-mnist
# docs/report: `fxq report` on the Fashion-MNIST ResNet-18 at W4A4 (where layers differ), and a
# screenshot of its page
report: setup
	.venv/bin/fxq quantize $(FASHION_NET) --w-bits 4 --a-bits 4 --out results/fashion_w4a4.fxq --quiet
	.venv/bin/fxq report results/fashion_w4a4.fxq $(FASHION_NET) --out docs/report --threads 2 --quiet
	chromium-headless-shell --no-sandbox --hide-scrollbars --window-size=1200,6400 \
		--screenshot=$(CURDIR)/docs/report/screenshot.png file://$(CURDIR)/docs/report/index.html 2>/dev/null
