# Two entry points: `make demo` and `make test`. Both create .venv on first use and install
# torch (CPU build) plus bitplan with its dev extras; a second run reinstalls nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bitplan-installed
TORCH  ?= torch==2.13.0
MODEL  ?= $(shell $(BIN)/python ../shared/models/materialize smollm2-135m-instruct 2>/dev/null || echo HuggingFaceTB/SmolLM2-135M-Instruct)
EVAL   ?= $(firstword $(wildcard ../shared/data/wikitext-2-raw-test.txt) $(EVAL_FALLBACK))
OUTDIR ?= runs/demo

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(OUTDIR)
	$(BIN)/bitplan inspect --model "$(MODEL)"
	$(BIN)/bitplan plan uniform --model "$(MODEL)" --weights w4g64a --kv k8v8 -o $(OUTDIR)/plan-w4g64a.json
	$(BIN)/bitplan apply --model "$(MODEL)" --plan $(OUTDIR)/plan-w4g64a.json $(if $(EVAL),--eval $(EVAL) --max-tokens 4096,)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check bitplan tests bench
	$(BIN)/mypy bitplan

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache runs
