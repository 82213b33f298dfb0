# `make test` and `make train` each create .venv (if needed), install the package into it, and run.
# The test extra holds everything both need (the data, demo and plots extras, pytest).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all typecheck train compare clean test-oldest test-py312 test-newest

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,typecheck]'
	touch $(STAMP)

install: $(STAMP)

# Cases marked slow (large compiles) run with `make test-all`; `make test` says how many it left out.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# mypy on the package, configured in pyproject.toml ([tool.mypy]).
typecheck: $(STAMP)
	$(PY) -m mypy

# The offline quickstart (configs/quickstart.py): a full-precision ResNet on scikit-learn's bundled
# digits, then W2A2 STE / EWGS / PEGE runs warm-started from it, and a table of test accuracies.
QUICK := runs/quickstart
train: $(STAMP)
	$(VENV)/bin/ewgs-jax-train --config quickstart:fp --workdir $(QUICK)/fp
	for v in w2a2_ste w2a2_ewgs w2a2_pege; do \
	  $(VENV)/bin/ewgs-jax-train --config quickstart:$$v --config.init_from=$(QUICK)/fp --workdir $(QUICK)/$$v || exit 1; \
	done
	$(PY) -m ewgs_jax.reporting table $(QUICK)/fp $(QUICK)/w2a2_ste $(QUICK)/w2a2_ewgs $(QUICK)/w2a2_pege

# A seeded comparison of STE, EWGS and PEGE on Fashion-MNIST (README "Comparing estimators on real
# data"); needs the IDX files (Debian: apt-get install dataset-fashion-mnist, or --set data_dir=DIR).
compare: $(STAMP)
	$(PY) -m ewgs_jax.compare --preset cpu --workdir runs/compare

# CI's three legs (.ci/run runs them all; each builds its own venv from scratch):
#   test-oldest  the oldest supported stack: Python 3.11 with every dependency at its declared floor
#                (pyproject.toml's ">=" pinned to "==" by .ci/floors.py)
#   test-py312   Python 3.12 with the newest releases that resolve (jax, flax, ...)
#   test-newest  Python 3.13 with the newest releases; then the type check and the wheel
# Give each its interpreter, e.g. `make test-newest PYTHON_NEWEST=python3.13`.
PYTHON_OLDEST ?= python3.11
PYTHON_312    ?= python3.12
PYTHON_NEWEST ?= python3.13
LEG_TESTS := -m pytest -q -n 2 --dist loadfile -m "not slow" tests
LEG_VERSIONS := grep -iE '^(jax|jaxlib|flax|optax|chex|orbax-checkpoint|numpy|mypy) '

# $(call newest_stack,PYTHON,VENV): a fresh venv with the newest releases that resolve, and the suite.
define newest_stack
	rm -rf $(2)
	$(1) -m venv $(2)
	$(2)/bin/python -m pip install --quiet --upgrade pip
	$(2)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test,typecheck]'
	$(2)/bin/python -m pip list 2>/dev/null | $(LEG_VERSIONS)
	$(2)/bin/python $(LEG_TESTS)
endef

test-oldest:
	rm -rf .venv-oldest
	$(PYTHON_OLDEST) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip
	.venv-oldest/bin/python .ci/floors.py > .venv-oldest/floors.txt
	.venv-oldest/bin/python -m pip install --quiet -c .venv-oldest/floors.txt -e '.[test]'
	.venv-oldest/bin/python -m pip list 2>/dev/null | $(LEG_VERSIONS)
	.venv-oldest/bin/python $(LEG_TESTS)

test-py312:
	$(call newest_stack,$(PYTHON_312),.venv-py312)

test-newest:
	$(call newest_stack,$(PYTHON_NEWEST),.venv-newest)
	.venv-newest/bin/python -m mypy   # the type check ([tool.mypy] in pyproject.toml)
	.venv-newest/bin/python -m pytest -q -m slow tests/test_packaging.py   # the wheel: configs, script, LICENSE

clean:
	rm -rf $(VENV) .venv-oldest .venv-py312 .venv-newest *.egg-info
