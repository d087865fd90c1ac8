# The two commands of the README: `make demo` (set up + run the main job) and `make test`.
PYTHON ?= python3
PRIME  ?= prime

.PHONY: help install contracts artifacts lint test bench up down status watch-miner demo clean

help:
	@echo "make demo         install everything, bring the local network up, onboard a miner, run a task"
	@echo "make test         lint, then run the test suite (real anvil, real Docker)"
	@echo "make lint         ruff (src tests bench) and mypy (src/prime, settings in pyproject.toml)"
	@echo "make install      install the Python package, the contract toolchain and the Docker engine"
	@echo "make up | down    start / stop the local network (anvil, contracts, discovery, validator, master)"
	@echo "make watch-miner  start a miner in the foreground against the local network"
	@echo "make status       live view of nodes and tasks"
	@echo "make bench        run the benchmarks (print figures)"

install:
	bash scripts/install-docker.sh
	cd contracts && npm ci --no-audit --no-fund
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'

contracts:
	cd contracts && npm ci --no-audit --no-fund

# Recompile the Solidity sources into the committed artifacts under src/prime/chain/artifacts/.
artifacts: contracts
	cd contracts && npm run build

lint:
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m mypy

# Lint first: a lint or type error fails `make test` before any test runs.
# pytest exits 5 when it collects no test; that must fail, and does (non-zero).
test: lint
	$(PYTHON) -m pytest -q -ra

bench:
	$(PYTHON) bench/gas.py
	$(PYTHON) bench/messages.py
	$(PYTHON) bench/challenge.py
	$(PYTHON) bench/heartbeats.py
	$(PYTHON) bench/tasks.py

up:
	$(PRIME) devnet up

down:
	$(PRIME) devnet down

status:
	$(PRIME) devnet status --watch

watch-miner:
	$(PRIME) devnet miner

demo: install
	$(PRIME) devnet demo

clean: down
	rm -rf .devnet
