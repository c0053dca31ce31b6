# The README's two commands: `make run` (the main job on embedded defaults) and `make test`.
# Each creates or reuses .venv and installs the project with everything it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test test-fast install clean bwrap

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[hf,test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# the code env's sandbox (rlpt/envs/jail.py) runs programs in bubblewrap: Debian's package, installed as root
bwrap:
	@command -v bwrap >/dev/null || apt-get install -y bubblewrap || (apt-get update && apt-get install -y bubblewrap) \
		|| { echo "the code sandbox needs bubblewrap: install the bwrap binary (Debian: apt-get install bubblewrap)"; exit 1; }

install: bwrap $(STAMP)

# the main job: SFT -> CoT -> DPO -> RLVR on embedded defaults; --resume makes a second `make run`
# skip the finished stages (it then only re-evaluates and re-prints the report). ARGS='key=value ...' to vary it.
run: $(STAMP)
	$(BIN)/rlpt pipeline --resume $(ARGS)

test: bwrap $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: bwrap $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) runs .pytest_cache
