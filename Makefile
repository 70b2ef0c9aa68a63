# Quick start: `make demo` trains on the bundled digits sample; `make test` runs the test suite.
# Both create the virtual environment .venv and install requirements.txt when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-zoo bench install clean system-deps

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

# serve.py's browser and Redis tests need Debian's chromium, chromium-driver and redis-server:
# installed here when missing and apt-get can (root, or sudo without a password); otherwise those
# tests skip and say why.
SYSTEM_BINS := chromium chromedriver redis-server
system-deps:
	@missing=""; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
		if command -v apt-get >/dev/null 2>&1 && [ "$$SUDO" != none ]; then \
			echo "installing chromium chromium-driver redis-server (missing:$$missing)"; \
			($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver redis-server >/dev/null) \
				|| echo "apt-get could not install them: the browser and Redis tests will skip"; \
		else echo "missing:$$missing and no apt-get to install them: the browser and Redis tests will skip"; fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

# Only the zoo test: every pytorch-classifier model name builds and runs a forward pass (~92 models; `make test` runs it too).
test-zoo: $(STAMP)
	$(PY) -m pytest -q -m zoo

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) sample runs/demo*
