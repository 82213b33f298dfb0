# `make test` and `make train` each create .venv (if needed), install the package into it, and run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all train compare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Cases marked slow (large compiles) run with `make test-all`.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The offline quickstart (configs/quickstart.py): a full-precision ResNet on scikit-learn's bundled
# digits, then W2A2 STE / EWGS / PEGE runs warm-started from it, and a table of test accuracies.
QUICK := runs/quickstart
train: $(STAMP)
	$(PY) train.py --config configs/quickstart.py:fp --workdir $(QUICK)/fp
	for v in w2a2_ste w2a2_ewgs w2a2_pege; do \
	  $(PY) train.py --config configs/quickstart.py:$$v --config.init_from=$(QUICK)/fp --workdir $(QUICK)/$$v || exit 1; \
	done
	$(PY) -m ewgs_jax.reporting table $(QUICK)/fp $(QUICK)/w2a2_ste $(QUICK)/w2a2_ewgs $(QUICK)/w2a2_pege

# A seeded comparison of STE, EWGS and PEGE on Fashion-MNIST (README "Comparing estimators on real
# data"); needs the IDX files (Debian: apt-get install dataset-fashion-mnist, or --set data_dir=DIR).
compare: $(STAMP)
	$(PY) -m ewgs_jax.compare --preset cpu --workdir runs/compare

clean:
	rm -rf $(VENV) *.egg-info
