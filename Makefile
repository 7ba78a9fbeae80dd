# longtake: `make demo` renders a clip with the built-in model, `make test` runs the tests.
# Both set up .venv first. torch is pinned to 2.13.0: on a CPU machine with the local CPU wheel
# pip takes that wheel, never the CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/longtake render "a red ball bouncing on a blue background" --seconds 60 --out ball.mp4 --preview ball.png

test: setup
	$(PY) -m pytest -q
