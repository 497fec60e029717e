# The two quick-start targets. Each creates .venv and installs what it needs once (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.idflux-installed

.PHONY: demo test bench clean-venv tiny-world tiny-eval

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk; a bare range would fetch a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps insightface==2.1
	touch $(STAMP)

## Main job on the embedded tiny world (idflux/assets/tiny, trained weights shipped in the package):
## train an identity adapter from its frozen base through the four-phase trainer (ID loss + InfoNCE on
## the pixel recogniser; CPU, a few minutes) -> runs/tiny/{checkpoints/, log.jsonl, loss.png,
## sample_sheet.png, summary.json (metrics measured on held-out identities)}.
demo: $(STAMP)
	$(BIN)/python -m idflux.train.tiny_world demo --out runs/tiny

## Rebuild every tiny-world model from scratch (about 1.5 h on 2 cores; resumable) and evaluate it on
## the held-out synthetic MultiID-Bench -> idflux/bench_perf/results/tiny_world/.
tiny-world: $(STAMP)
	$(BIN)/python -m idflux.train.tiny_world build

tiny-eval: $(STAMP)
	$(BIN)/python -m idflux.train.tiny_world eval

## Benchmarks of every op on the CPU -> results/bench_cpu.json + results/plots/<op>.png
bench: $(STAMP)
	$(BIN)/idflux bench --device cpu --out results/bench_cpu.json --plot results/plots

## Whole test suite (TRITON_INTERPRET=1 and HF_HUB_OFFLINE=1 are set by tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
