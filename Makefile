# The README's two commands: `make demo` (main job) and `make test` (test suite).
# Both create the project-local .venv with pip on first use.
VENV := .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed
# CoPE's fused CPU kernel (encoders/csrc), compiled once here; without a C++ compiler the
# build says so and CoPE runs on its PyTorch implementations.
KERNEL := encoders/csrc/build/.attempted

.PHONY: install demo test lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

$(KERNEL): $(STAMP) encoders/csrc/cope_cpu.cpp encoders/cope_cpu.py
	$(VENV)/bin/python -m encoders.cope_cpu
	mkdir -p $(dir $(KERNEL)) && touch $(KERNEL)

install: $(STAMP) $(KERNEL)

demo: install
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cope compare audio-events --pe cope,rope,abs --seeds 1 --out runs/demo

# Passive OpenMP waiting: busy-waiting threads slow torch ~10x on a shared 2-CPU machine.
test: install
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
