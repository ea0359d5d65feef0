# The README's two commands: `make demo` (main job) and `make test` (test suite).
# Both create the project-local .venv with pip on first use.
VENV := .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: install demo test lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cope compare audio-events --pe cope,rope,abs --seeds 1 --out runs/demo

# Passive OpenMP waiting: busy-waiting threads slow torch ~10x on a shared 2-CPU machine.
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
