# Setup and the two entry points: `make demo` (a real pruning run on the bundled digits data)
# and `make test` (the whole test suite). Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/digits_demo

.PHONY: demo test install install-test bench peer methods clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo 'No python3.11 or python3 on PATH: install Python 3.11 first.'; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

$(VENV)/.installed-peer: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[peer]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m train.main --config=configs/digits_dpm.py --workdir=$(WORKDIR)

test: install-test
	$(PY) -m pytest -n 2 tests

# Every benchmark in bench/, each run as a module from the project root (it imports train/),
# but the peer benchmark, which needs PyTorch (`make peer`), and the methods matrix, which
# takes hours (`make methods`).
bench: install
	for b in bench/*.py; do \
	  case $$b in */__init__.py|*/peer_torch_pruning.py|*/peer_torch_job.py|*/methods.py) continue;; esac; \
	  $(PY) -m bench.$$(basename $$b .py) || exit 1; \
	done

# The same pruning job with Torch-Pruning and with dpm_jax, side by side (a few minutes per
# budget and seed; BUDGETS="0.5" SEEDS="0" for a short run).
BUDGETS ?= 0.5 0.2
SEEDS ?= 0 1 2
peer: $(VENV)/.installed-peer
	$(PY) -m bench.peer_torch_pruning --budgets $(BUDGETS) --seeds $(SEEDS)

# The methods matrix on MNIST-1D and digits (hours; resumable; see bench/methods.py), e.g.
# make methods ARGS="--budgets 0.5 --seeds 0".
methods: install
	$(PY) -m bench.methods $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
