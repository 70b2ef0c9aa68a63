# Quick start: `make demo` trains on the bundled digits sample; `make test` runs the test suite.
# Both create the virtual environment .venv and install requirements.txt when needed.
# `make cpp` builds the C++ classifier deploy/cpp/build/classify against the torch wheel's libtorch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CPP_BUILD := deploy/cpp/build
# what the C++ build needs from apt (a command or a header, and its package)
CPP_DEPS := cmake:cmake g++:g++ /usr/include/stb/stb_image.h:libstb-dev /usr/include/nlohmann/json.hpp:nlohmann-json3-dev

.PHONY: demo test test-zoo bench install clean cpp cpp-deps

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

test: $(STAMP) cpp-deps
	$(PY) -m pytest -q

# Every pytorch-classifier model name builds and runs a forward pass (slow: ~92 models).
test-zoo: $(STAMP)
	$(PY) -m pytest -q -m zoo

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

# The C++ tool chain and headers, installed with apt-get when missing (where there is apt-get and
# root); without them the C++ tests skip and say why.
cpp-deps:
	@missing=""; for dep in $(CPP_DEPS); do what=$${dep%%:*}; pkg=$${dep##*:}; \
	  if [ "$${what#/}" = "$$what" ]; then command -v $$what >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	  else [ -f $$what ] || missing="$$missing $$pkg"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing (apt-get)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	  else echo "the C++ build needs$$missing (no apt-get as root here: the C++ tests skip)"; fi; fi

cpp: $(STAMP) cpp-deps
	cmake -S deploy/cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j 2

clean:
	rm -rf $(VENV) sample runs/demo* $(CPP_BUILD)
