# Two entry points: `make demo` and `make test`. Both create .venv on first use and install
# torch (CPU build) plus bitplan with its dev extras; a second run reinstalls nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bitplan-installed
TORCH  ?= torch==2.13.0
MODEL  ?= $(shell $(BIN)/python ../shared/models/materialize smollm2-135m-instruct 2>/dev/null || echo HuggingFaceTB/SmolLM2-135M-Instruct)
EVAL   ?= $(firstword $(wildcard ../shared/data/wikitext-2-raw-test.txt) $(EVAL_FALLBACK))
CALIB  ?= $(firstword $(wildcard ../shared/data/wikitext-2-valid-unk.txt) $(CALIB_FALLBACK))
OUTDIR ?= runs/demo

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The demo is a small budgeted search (<= 4.5 average weight bits, <= 4 average KV bits) sized to finish
# in a few minutes on a 2-core CPU: 2048 calibration tokens, KV bits {2,4} (+16), 200 proxy trials,
# 4 plans verified on 2048 held-out calibration tokens, the picked plan reported on 4096 test tokens.
# A rerun continues the run directory. The full-size search is `bitplan search` without these limits.
DEMO_SEARCH = --tokens 2048 --kv 2,4 --max-avg-bits 4.5 --max-kv-bits 4 --trials 200 \
	--verify-top 4 --verify-tokens 2048 --eval-tokens 4096

demo: $(STAMP)
	@test -n "$(CALIB)" || { echo "error: no calibration text: pass CALIB=FILE (e.g. wikitext-2 validation)"; exit 2; }
	@mkdir -p $(OUTDIR)
	$(BIN)/bitplan inspect --model "$(MODEL)"
	@echo "search: $(DEMO_SEARCH)"
	$(BIN)/bitplan search --model "$(MODEL)" --calib $(CALIB) $(if $(EVAL),--eval $(EVAL),) $(DEMO_SEARCH) -o $(OUTDIR)/search
	$(BIN)/bitplan apply --model "$(MODEL)" --plan $(OUTDIR)/search/best.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check bitplan tests bench
	$(BIN)/mypy bitplan

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache runs
