# Both targets create .venv when missing and install everything the project needs, at the versions
# pinned in constraints.txt (so a new upstream release never changes a CI run by surprise).
# torch's CPU build is installed first where no torch is present: an unpinned torch would pull a
# multi-GB CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weightkit-installed

.PHONY: demo test lint format

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/weightkit demo

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
