# Every target first runs scripts/setup.sh, which installs whatever is missing
# (and nothing when all is there), so each works on a fresh Debian 12 machine.
VENV   := .venv
PYTHON := $(VENV)/bin/python
PYTEST := $(PYTHON) -m pytest

.PHONY: setup demo test lint test-unit test-bpf test-integration test-vm soak bench bench-quick architecture graph-picture clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PYTHON) scripts/demo.py examples/it-hr.yaml

lint: setup
	$(PYTHON) -m ruff check control tests scripts bench
	$(PYTHON) -m mypy

test: lint
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) -m unit tests

test-bpf: setup
	$(PYTEST) -m bpf tests

test-integration: setup
	$(PYTEST) -m integration tests

# The long variants (pytest marker `soak`): 10M hostile frames, 10,000 alternations, ten times the kills.
soak: setup
	$(PYTEST) -m soak tests

# The kernel-facing suite (pytest marker `vm`) inside each kernel of vagrant/kernels.txt.
test-vm: setup
	@bash scripts/test-vm.sh

# The performance suite (bench/RESULTS.md, bench/plots/, bench/results/*.json):
# the full run takes about 30-35 minutes, the quick one a few.
bench: setup
	PYTHONPATH=. $(PYTHON) -m bench

bench-quick: setup
	PYTHONPATH=. $(PYTHON) -m bench --quick

# docs/architecture.dot and .svg: the package's import graph by stage, drawn from the code
# (tests/unit/test_architecture.py fails when the committed picture is out of date).
architecture: setup
	$(PYTHON) -m tests.architecture docs

# docs/it-hr-graph.dot and .svg: the README's picture of examples/it-hr.yaml, drawn by
# `isoebpf graph` (tests/unit/test_graph.py fails when the committed picture is out of date).
graph-picture: setup
	$(PYTHON) -m isoebpf.cli graph examples/it-hr.yaml -o docs/it-hr-graph.dot
	$(PYTHON) -m isoebpf.cli graph examples/it-hr.yaml --format svg -o docs/it-hr-graph.svg

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
