# Every target builds its own virtual environment in .venv. TORCH pins the CPU wheel used in
# development and CI; the package itself only asks for torch>=2.4.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(subst =,-,$(TORCH))
SOLVER_TESTS := tests/test_mgda.py tests/test_dual_cone.py tests/test_cagrad.py tests/test_weightings.py tests/test_stateful.py \
                tests/test_precision.py tests/test_numerics.py

.PHONY: install test test-cuda fuzz lint typecheck docs wheel demo bench bench-cuda clean

$(STAMP): pyproject.toml setup.py gradagg/_kkt.c
	rm -f gradagg/_kkt.cpython-*.so  # a version-specific build would shadow the abi3 one
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,demo,dev,docs]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check gradagg tests benchmarks examples docs setup.py

# The suite runs with the C solvers (required to be built here), then the solver tests run again on
# the torch solvers, which are what CUDA tensors and builds without a compiler use.
# The public API under mypy --strict (configured in pyproject.toml).
typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	GRADAGG_REQUIRE_NATIVE=1 HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q
	GRADAGG_NATIVE=0 HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q $(SOLVER_TESTS)

# On a machine with a CUDA GPU: the suite with the Triton kernels on the device (CPU tensors keep the
# C solvers), then the host route's tests.
test-cuda: install
	GRADAGG_SOLVER=triton HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q
	GRADAGG_SOLVER=host HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q $(SOLVER_TESTS) tests/test_host_route.py

fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

# The documentation site, into site/; --strict turns a broken link or reference into an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# An sdist and an abi3 wheel (one per platform for every CPython >= 3.10) into dist/.
wheel: install
	$(BIN)/python -m build --outdir dist

demo: install
	$(BIN)/python -m gradagg demo

bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m benchmarks.bench --out bench-out
	$(BIN)/python -m benchmarks.memory --out bench-out
	$(BIN)/python -m benchmarks.amp --out bench-out

bench-cuda: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m benchmarks.cuda --out bench-cuda

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .mypy_cache *.egg-info build dist site gradagg/*.so
