# The README's commands. Everything installs into .venv with the exact versions of
# constraints.txt (our lock; users get the ranges of pyproject.toml: docs/install.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := constraints.txt
PYTEST_ARGS ?=

.PHONY: install lock docs demo test test-all lint bench bench-int8 gpu-check clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c $(LOCK) -e ".[all,cpu]"
	touch $(STAMP)

install: $(STAMP)

## make lock: rewrite constraints.txt from what .venv holds now (after a deliberate upgrade)
lock:
	{ grep '^#' $(LOCK); $(BIN)/pip freeze --all --exclude-editable | grep -v '^pip=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

## make docs: regenerate docs/cli.md, the CLI reference, from the Typer app (tests/test_docs.py checks it)
docs: $(STAMP)
	$(BIN)/typer idle_export.cli utils docs --name idle-export --title "idle-export CLI reference" \
	    --output docs/cli.md

## make demo: seeded DeiT-Small IdleViT r=0.7 → idle + dense ONNX → parity checks (demo_out/)
demo: $(STAMP)
	$(BIN)/idle-export demo -o demo_out

## make test: the default suite (no slow or GPU tests)
test: $(STAMP)
	$(BIN)/pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## make bench: idle vs dense on the demo DeiT-S, ONNX Runtime CPU (JSON + plot in demo_out/)
bench: demo
	$(BIN)/idle-export bench demo_out/deit_small_r0.7_demo.pth --backend ort --batch 1,8,64 \
	    --independent --json demo_out/bench.json --plot demo_out/bench.png

## make bench-int8: the demo DeiT-S calibrated to INT8 on the built-in photos, INT8 idle vs FP32 idle/dense at
## batch 64, one thread (per-core throughput; BENCH_THREADS=2 for both cores). The INT8 file carries the ort
## target's passes; --optimize gives the portable FP32 files the same passes in memory.
BENCH_THREADS ?= 1
bench-int8: demo
	$(BIN)/idle-export calibrate demo_out/deit_small_idle.onnx -o demo_out/deit_small_idle.int8.ort.onnx
	$(BIN)/idle-export bench demo_out/deit_small_idle.int8.ort.onnx demo_out/deit_small_idle.onnx \
	    demo_out/deit_small_dense.onnx --backend ort --batch 64 --threads $(BENCH_THREADS) \
	    --optimize --independent --json demo_out/bench_int8.json

## make gpu-check: TensorRT FP32/FP16/INT8 idle vs dense on an NVIDIA GPU → gpu_acceptance_out/report.json
gpu-check: $(STAMP)
	scripts/gpu_acceptance.sh gpu_acceptance_out

lint: $(STAMP)
	$(BIN)/ruff check idle_export tests plugins

clean:
	rm -rf demo_out gpu_acceptance_out .pytest_cache
