# Quick start: `make demo` trains on the bundled digits sample; `make test` runs the test suite.
# Both create the virtual environment .venv and install requirements.txt when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-zoo bench install clean

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

test: $(STAMP)
	$(PY) -m pytest -q

# Only the zoo test: every pytorch-classifier model name builds and runs a forward pass (~92 models; `make test` runs it too).
test-zoo: $(STAMP)
	$(PY) -m pytest -q -m zoo

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) sample runs/demo*
