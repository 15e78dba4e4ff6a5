# Quick start: `make demo` (install + the main job) and `make test` (install + the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench-ledger install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an open torch range would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## The main job: a character GPT on Shakespeare, 2 volunteer nodes, receipts, spot checks, ledger.
demo: $(STAMP)
	$(BIN)/gpucoin train jobs/shakespeare_char/job.yaml --summary-json out/demo-summary.json

## Lint and format checks (ruff, config in pyproject.toml), then the whole test suite (unit, ledger and security on
## SQLite and PostgreSQL, integration with Ray, the main job end to end, small).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@[ -n "$$GPUCOIN_TEST_POSTGRES" ] || scripts/ensure-postgres
	$(BIN)/python -m pytest -q --durations=25 tests

## The ledger's settlement throughput on SQLite and PostgreSQL against signature recovery alone.
bench-ledger: $(STAMP)
	@scripts/ensure-postgres
	$(BIN)/python -m benchmarks.ledger.run

## EIP-712 sign and verify rates of gpucoin.wallet.messages against plain eth-account (coincurve).
.PHONY: bench-signatures
bench-signatures: $(STAMP)
	$(BIN)/python -m benchmarks.signatures.run

## What verification costs per replayed interval and what it catches (benchmarks/README.md).
.PHONY: bench-verification bench-training
bench-verification: $(STAMP)
	$(BIN)/python -m benchmarks.verification.run

## Steps per second under gpucoin train against plain Ray Train + DeepSpeed on the same nodes (~16 minutes; as root, nothing else running).
bench-training: $(STAMP)
	$(BIN)/python -m benchmarks.training.run

## Unit tests only (no Ray): seconds.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
