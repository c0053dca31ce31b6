# The README's two commands: `make run` (the main job on embedded defaults) and `make test`.
# Each creates or reuses .venv and installs the project with everything it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test test-fast install clean sysdeps

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

clean:
	rm -rf $(VENV) runs .pytest_cache
