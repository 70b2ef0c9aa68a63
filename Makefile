# Quick start: `make demo` trains on the bundled digits sample; `make test` runs the test suite.
# Both create the virtual environment .venv and install requirements.txt when needed.
# `make cpp` builds the C++ classifier deploy/cpp/build/classify against the torch wheel's libtorch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CPP_BUILD := deploy/cpp/build
# What the tests start or build, from Debian, as "a command or a header:its package": serve.py's
# browser and Redis tests (chromium, chromium-driver, redis-server) and the C++ classifier
# (cmake, g++, stb_image, nlohmann-json).
SYSTEM_DEPS := chromium:chromium chromedriver:chromium-driver redis-server:redis-server cmake:cmake g++:g++ \
	/usr/include/stb/stb_image.h:libstb-dev /usr/include/nlohmann/json.hpp:nlohmann-json3-dev

.PHONY: demo test test-zoo bench install clean cpp system-deps

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) processing.py --sample digits --data_path sample/digits --output_path sample --force
	$(PY) main.py --model_name resnet18 --image_size 32 --batch_size 64 --epoch 12 --workers 0 \
		--train_path sample/train --val_path sample/val --test_path sample/test --label_path sample/label.txt \
		--save_path runs/demo

# Installed with one apt-get when missing and apt-get can (root, or sudo without a password);
# otherwise the tests that need them skip and say why.
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do what=$${dep%%:*}; pkg=$${dep##*:}; \
	  if [ "$${what#/}" = "$$what" ]; then command -v $$what >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	  else [ -f $$what ] || missing="$$missing $$pkg"; fi; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
		if command -v apt-get >/dev/null 2>&1 && [ "$$SUDO" != none ]; then \
			echo "installing$$missing (apt-get)"; \
			($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq$$missing >/dev/null) \
				|| echo "apt-get could not install$$missing: the tests that need them will skip"; \
		else echo "missing:$$missing and no apt-get to install them: the tests that need them will skip"; fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

# Only the zoo test: every pytorch-classifier model name builds and runs a forward pass (~92 models; `make test` runs it too).
test-zoo: $(STAMP)
	$(PY) -m pytest -q -m zoo

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

cpp: $(STAMP) system-deps
	cmake -S deploy/cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j 2

clean:
	rm -rf $(VENV) sample runs/demo* $(CPP_BUILD)
