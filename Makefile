# Two entry points for a fresh clone: `make demo` (main job) and `make test`.
# Both create .venv, install fedrecon and what it needs, then run.
# TORCH_SPEC chooses the torch to install: the CPU CI machine has torch==2.13.0 on disk;
# a GPU user sets e.g. TORCH_SPEC="torch>=2.2" or TORCH_SPEC=keep (use what the venv has).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedrecon-installed

.PHONY: demo test test-slow test-cuda bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23" "setuptools>=77"
	if [ "$(TORCH_SPEC)" != "keep" ]; then $(PY) -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet -e ".[test,flower]"
	# fastMRI's own mask functions: an independent reference for the mask tests only
	$(PY) -m pip install --quiet --no-deps "fastmri==0.3.0"
	# real anatomy offline: the MNI152 template file inside nilearn's wheel (read with nibabel;
	# nilearn itself is never imported, so its dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps "nilearn==0.14.1"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda

bench: $(STAMP)
	$(PY) scripts/bench_operators.py

clean:
	rm -rf $(VENV) build *.egg-info runs/demo
