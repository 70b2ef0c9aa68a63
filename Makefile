# Quick start: `make demo` trains on the bundled digits sample; `make test` runs the test suite.
# Both create the virtual environment .venv on first use; `make demo` installs the training
# requirements (requirements.txt), `make test` everything the tests use (requirements/dev.txt), both
# with the exact torch and torchvision of requirements/constraints.txt (requirements.txt gives a range).
# `make docs` builds the documentation site into site/ (mkdocs).
# `make shell` opens a shell with .venv activated (installing requirements.txt first if needed).
# `make cpp` builds the C++ classifier deploy/cpp/build/classify against the torch wheel's libtorch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-train
DEV_STAMP := $(VENV)/.installed-dev
TRACKERS_STAMP := $(VENV)/.installed-trackers
DOCS_STAMP := $(VENV)/.installed-docs
MOBILE_STAMP := $(VENV)/.installed-mobile

CPP_BUILD := deploy/cpp/build
# What the tests start or build, from Debian, as "a command or a header:its package": serve.py's
# browser and Redis tests (chromium, chromium-driver, redis-server), the C++ classifier
# (cmake, g++, stb_image, nlohmann-json) and a CJK font for class names such as 猫 (tests/test_fonts.py).
SYSTEM_DEPS := chromium:chromium chromedriver:chromium-driver redis-server:redis-server cmake:cmake g++:g++ \
	/usr/include/stb/stb_image.h:libstb-dev /usr/include/nlohmann/json.hpp:nlohmann-json3-dev \
	/usr/share/fonts/truetype/wqy/wqy-microhei.ttc:fonts-wqy-microhei

.PHONY: demo test test-zoo test-trackers bench install install-dev clean cpp system-deps docs docs-serve shell mobile-deps

# PyTorch's CPU-only wheels (without NVIDIA's CUDA libraries and triton: about 4 GB less) when this
# machine has no NVIDIA GPU and their index answers; otherwise the default wheels of the same pinned
# version. TORCH_CPU_INDEX= (empty) turns it off.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX = $(shell [ -n "$(TORCH_CPU_INDEX)" ] && ! command -v nvidia-smi >/dev/null 2>&1 && \
	$(PYTHON) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1 && \
	echo "--extra-index-url $(TORCH_CPU_INDEX)")
CONSTRAINTS := requirements/constraints.txt
PIP := $(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_INDEX) -c $(CONSTRAINTS)

# A venv that could not be made (Debian/Ubuntu without python3-venv: "ensurepip is not available") is
# removed, so the next `make` makes it again instead of finding a python without pip.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "could not create $(VENV): on Debian/Ubuntu install python3-venv (sudo apt-get install python3-venv), then run make again" >&2; exit 1; }

$(STAMP): requirements.txt $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) -r requirements.txt
	touch $(STAMP)

$(DEV_STAMP): requirements.txt requirements/deploy.txt requirements/docs.txt requirements/extras.txt requirements/tune.txt requirements/dev.txt $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) -r requirements/dev.txt
	touch $(STAMP) $(DOCS_STAMP) $(DEV_STAMP)

$(DOCS_STAMP): requirements/docs.txt | $(VENV)/bin/python
	$(PIP) -r requirements/docs.txt
	touch $(DOCS_STAMP)

$(TRACKERS_STAMP): requirements/trackers.txt $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) -r requirements/trackers.txt
	touch $(TRACKERS_STAMP)

install: $(STAMP)

# An interactive shell with .venv activated, so `python main.py ...` finds the installed packages
# (the same as `source .venv/bin/activate`); `exit` leaves it.
shell: $(STAMP)
	@echo "virtual environment $(VENV) active: exit to leave"
	@VIRTUAL_ENV="$(CURDIR)/$(VENV)" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $${SHELL:-/bin/sh} -i

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(PY) processing.py --sample digits --data_path sample/digits --output_path sample --force
	$(PY) main.py --model_name resnet18 --image_size 32 --batch_size 64 --epoch 12 --workers 0 \
		--train_path sample/train --val_path sample/val --test_path sample/test --label_path sample/label.txt \
		--save_path runs/demo

# Installed with one apt-get when missing and apt-get can (root, or sudo without a password);
# otherwise the tests that need them skip and say why.
MISSING_DEPS = missing=""; for dep in $(SYSTEM_DEPS); do what=$${dep%%:*}; pkg=$${dep\#\#*:}; \
	  if [ "$${what\#/}" = "$$what" ]; then command -v $$what >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	  else [ -f $$what ] || missing="$$missing $$pkg"; fi; done

system-deps:
	@$(MISSING_DEPS); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
		if command -v apt-get >/dev/null 2>&1 && [ "$$SUDO" != none ]; then \
			echo "installing$$missing (apt-get)"; \
			($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq$$missing >/dev/null) \
				|| echo "apt-get could not install$$missing: the tests that need them will skip"; \
		else echo "missing:$$missing and no apt-get to install them: the tests that need them will skip"; fi; \
	fi

# Once every system dependency is there, a test that needs one may not skip (REQUIRE_SYSTEM_DEPS=1,
# tests/system_deps.py): a broken install or skip condition fails, as in CI, instead of passing as skips.
# export.py's phone formats (NCNN, TFLite, Core ML: requirements/mobile.txt, then mobile-tflite.txt
# without dependencies, whose pins conflict with the rest), about 1 GB: installed for `make test` when
# the package registry has them; if that fails, tests/test_mobile_export.py skips and names the commands.
mobile-deps: $(DEV_STAMP)
	@[ -f $(MOBILE_STAMP) ] || { $(PIP) -r requirements/mobile.txt && $(PIP) --no-deps -r requirements/mobile-tflite.txt && \
	  touch $(MOBILE_STAMP); } || echo "the mobile exporters did not install: the tests of export.py's ncnn, tflite and coreml skip"

# The suite in two pytest-xdist worker processes (--dist loadfile: a test file's tests run in one
# worker, so a module-scoped fixture, often a trained run, is built once), so that one worker's
# single-threaded imports, subprocesses and waits overlap the other's on CI's 2 cores
# (docs/development.md#how-tests-run). In one process, as before: make test PYTEST_ARGS=
PYTEST_ARGS ?= -n 2 --dist loadfile
test: $(DEV_STAMP) system-deps mobile-deps
	@$(MISSING_DEPS); if [ -z "$$missing" ]; then export REQUIRE_SYSTEM_DEPS=$${REQUIRE_SYSTEM_DEPS:-1}; \
	else echo "missing:$$missing: the tests that need them skip"; fi; $(PY) -m pytest -q $(PYTEST_ARGS)

# The tracker tests with wandb and MLflow installed (offline; `make test` skips them without the packages).
test-trackers: $(DEV_STAMP) $(TRACKERS_STAMP)
	$(PY) -m pytest -q tests/test_ecosystem.py -k tracker

# Only the zoo test: every pytorch-classifier model name builds and runs a forward pass (~92 models; `make test` runs it too).
test-zoo: $(DEV_STAMP)
	$(PY) -m pytest -q -m zoo

# The documentation site (mkdocs.yml, docs/): built into site/ with --strict, so a broken link, a missing
# anchor or a flags marker naming no script fails. `make test` builds it too (tests/test_docs.py).
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The site at http://127.0.0.1:8000, rebuilt on every save.
docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: $(DEV_STAMP)
	$(PY) benchmarks/train_throughput.py

cpp: $(STAMP) system-deps
	cmake -S deploy/cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j 2

clean:
	rm -rf $(VENV) sample runs/demo* $(CPP_BUILD) site
