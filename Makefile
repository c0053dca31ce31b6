# The README's two commands: `make run` (the main job on embedded defaults) and `make test`.
# Each creates or reuses .venv and installs the project with everything it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test test-fast test-vllm install clean sysdeps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[hf,test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Debian packages, installed as root when missing: bubblewrap (the code env's sandbox, rlpt/envs/jail.py), and
# chromium + chromium-driver (the lab's browser tests, tests/test_lab_browser.py)
SYSDEPS := bubblewrap:bwrap chromium:chromium chromium-driver:chromedriver
sysdeps:
	@missing=""; for pb in $(SYSDEPS); do command -v $${pb#*:} >/dev/null || missing="$$missing $${pb%%:*}"; done; \
	[ -z "$$missing" ] || apt-get install -y $$missing || (apt-get update && apt-get install -y $$missing) \
		|| { echo "install the Debian packages$$missing (apt-get install$$missing)"; exit 1; }

install: sysdeps $(STAMP)

# the main job: SFT -> CoT -> DPO -> RLVR on embedded defaults; --resume makes a second `make run`
# skip the finished stages (it then only re-evaluates and re-prints the report). ARGS='key=value ...' to vary it.
run: $(STAMP)
	$(BIN)/rlpt pipeline --resume $(ARGS)

# two pytest workers, one per core (tests run torch at 1 thread); a file's tests stay on one worker, so a
# module's expensive fixture (a trained SFT start) is built once
XDIST := -n 2 --dist loadfile
test: sysdeps $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

test-fast: sysdeps $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m 'not slow'

# rollout.backend=vllm against a real vLLM (tests/test_vllm_backend.py, skipped elsewhere, and the vLLM-free
# tests/test_vllm_plumbing.py), on a CUDA machine only, in its own .venv-vllm. vLLM (pyproject's `vllm` extra) is a
# CUDA wheel pinning torch==2.14.0 against rlpt's torch==2.13.0, and fastapi<0.137 against the test extra's
# fastapi==0.165.0, so pip resolves neither '.[vllm]' nor '.[hf,test,vllm]' (both ResolutionImpossible, checked):
# rlpt goes in without deps, then one resolution of its requirements (core, hf, vllm) minus torch, plus pytest,
# read from pyproject.toml (tomllib: not the installed metadata, which a stale rlpt.egg-info in the checkout shadows).
# vLLM needs Python >= 3.11: PY=python3.11 make test-vllm.
VLLM_VENV := .venv-vllm
VLLM_TESTS := tests/test_vllm_backend.py tests/test_vllm_plumbing.py
VLLM_REQS := import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	o = p["optional-dependencies"]; [print(r) for r in p["dependencies"] + o["hf"] + o["vllm"] \
	if re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0].lower() != "torch"]
test-vllm:
	@if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "make test-vllm: no CUDA GPU on this machine (nvidia-smi is missing or lists no GPU): vLLM's wheel" \
			"is built for CUDA, so rollout.backend=vllm's tests run on a CUDA machine only; here make test reports" \
			"tests/test_vllm_backend.py as skipped and runs tests/test_vllm_plumbing.py"; exit 2; fi
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make test-vllm: vLLM needs" \
		"Python >= 3.11, $(PY) is older: PY=python3.11 make test-vllm"; exit 2; }
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/python -c '$(VLLM_REQS)' > $(VLLM_VENV)/rlpt-requirements.txt
	$(VLLM_VENV)/bin/python -m pip install --quiet -r $(VLLM_VENV)/rlpt-requirements.txt 'pytest>=8'
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider -rs $(VLLM_TESTS)

clean:
	rm -rf $(VENV) runs .pytest_cache
