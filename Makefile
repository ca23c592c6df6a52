# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data/prepared/bundled
DEMO_RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml scripts/install_torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	test -f $(DATA)/meta.json || $(BIN)/saeformer prepare --out $(DATA)
	$(BIN)/saeformer train configs/tiny-cpu.toml --run-dir $(DEMO_RUN)
	$(BIN)/saeformer plot $(DEMO_RUN)
	$(BIN)/saeformer report $(DEMO_RUN)

test: setup
	$(BIN)/ruff check saeformer tests scripts
	$(BIN)/python -m pytest -q tests
	TRITON_INTERPRET=1 SAEFORMER_KERNELS=triton $(BIN)/python -m pytest -q tests/triton

lint: setup
	$(BIN)/ruff check saeformer tests scripts

clean:
	rm -rf $(VENV) runs data/prepared
