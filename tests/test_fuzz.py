"""Fuzz the input boundary (issue 13 §3): a few hundred generated bad inputs, seeded, over the command line (bad
overrides built from every job's schema, bad YAML recipes, usage mistakes, bad pair files and checkpoints), the
pairs reader and the engine API.

Every CLI input must end with exit status 2 and exactly one line on stderr naming the problem (no traceback), leave
no new file or folder behind, and leave an existing run folder, used with --resume, byte-identical. A library
input must raise its typed error (ConfigError / PreferenceDataError / ValueError) with a one-line message.
Config mistakes must be refused before any job starts: the jobs are replaced by a tripwire that fails the test
if a bad config ever reaches one. A handful of real processes check the no-traceback promise end to end.

    pytest tests/test_fuzz.py
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types as at
import pytest
from pydantic import BaseModel

from rlpt.cli import EvalJob, main
from rlpt.config import _valid_keys, load_config
from rlpt.preference.data import PreferenceDataError, load_pairs
from rlpt.sft import SFTJob, train_sft

from conftest import SFT_SHAPE, TINY, TOK, model_overrides, tiny_gpt

SEED = 13
MAX_LINE = 1200      # the longest one-line error any input may produce


# -- the schema's leaves, and values each one must refuse --------------------------------------------------
def leaves(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, typing.Any, list]]:
    """(dotted key, annotation, constraints) of every field under `cls` (the algorithm section stays one leaf)."""
    out = []
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and name != "algorithm":
            out += leaves(ann, prefix + name + ".")
        else:
            out.append((prefix + name, ann, f.metadata))
    return out


def bad_values(ann, meta: list) -> list[str]:
    """Override values (YAML text) that the field must refuse, whatever else the config says."""
    args = typing.get_args(ann)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), ann) if optional else ann
    shapes = ["[1, 2]", "{a: 1}"]          # a list or a mapping where a scalar belongs
    if typing.get_origin(base) is typing.Literal:
        return ["nope", "[direct]", *shapes]
    if base is bool:
        return ["maybe", "2", *shapes]
    if base is str:
        out = ["a\0b", *shapes]
        return out + [""] if any(isinstance(m, at.MinLen) for m in meta) else out
    if typing.get_origin(base) is tuple:                    # Adam's betas
        return ["[1.5, 0.9]", "[0.9, -0.1]", "[0.9]", "[.nan, 0.9]", "[1, 1]", "betas"]
    if base in (int, float):
        out = ["many", *shapes, str(2 ** 64 + 1) if base is int else "1e999", ".inf", ".nan", "-.inf"]
        if base is int:
            out.append("1.5")
        if not optional:
            out.append("null")
        for m in meta:
            if isinstance(m, at.Ge):
                out.append(str(m.ge - 1))
            if isinstance(m, at.Gt):
                out.append(str(m.gt))
            if isinstance(m, at.Le):
                out.append(str(m.le + 1))
            if isinstance(m, at.Lt):
                out.append(str(m.lt))
        return out
    return []


ALGORITHM_BAD = ["algorithm.name=nope", "algorithm.beta=.inf", "algorithm.beta=-1", "algorithm.bta=0.1",
                 "algorithm.name=ppo algorithm.clip_eps=.nan", "algorithm=3", "algorithm.name=grpo rollout.k=1",
                 "algorithm.beta=[1]", "algorithm.name=[grpo]"]


def mutate(key: str, rng: random.Random, valid: set[str]) -> str:
    """A typo of `key` that is no valid key."""
    while True:
        i = rng.randrange(len(key))
        op = rng.choice("dis")
        ch = rng.choice("abcdefghijklmnopqrstuvwxyz_")
        k = key[:i] + key[i + 1:] if op == "d" else key[:i] + ch + key[i:] if op == "i" else key[:i] + ch + key[i + 1:]
        if k and k not in valid and not k.startswith(".") and not k.endswith(".") and ".." not in k:
            return k


def schema_cases(rng: random.Random, cls, n: int) -> list[tuple[list[str], str]]:
    """n (bad overrides, what the error must name): a bad value for a leaf, a typo of a key, a value where a
    section belongs, or an override that is not key=value."""
    valid = set(_valid_keys(cls))
    pool = [(k, v) for k, ann, meta in leaves(cls) for v in bad_values(ann, meta)]
    cases = []
    for _ in range(n):
        r = rng.random()
        if r < 0.7 and pool:
            k, v = rng.choice(pool)
            cases.append(([f"{k}={v}"], k.split(".")[-1]))
        elif r < 0.85:
            k = mutate(rng.choice(sorted(valid)), rng, valid)
            parts = k.split(".")   # the error names the first part that is no key: 'erun' of erun.progress
            cases.append(([f"{k}=1"], next(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                                           if ".".join(parts[:i]) not in valid)))
        elif r < 0.93:
            sec = rng.choice(sorted({k.split(".")[0] for k in valid if "." in k}))
            cases.append(([f"{sec}=3", f"{sec}.x=1"], sec))
        else:
            item = rng.choice(["steps", "=3", "a..b=1", ".a=1", "a.=1", " =2"])
            cases.append(([item], item.strip()))
    return cases


# -- fixtures: one real run folder, a tripwire on every job -------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A real 2-step SFT run (TINY): the existing run data the fuzz must leave byte-identical."""
    out = tmp_path_factory.mktemp("runs")
    job = load_config(SFTJob, None, [*TINY, f"run.out_dir={out}", "run.name=base", "sft.steps=2", "sft.ckpt_every=2"])
    _, run, _ = train_sft(job)
    run.close()
    return run.dir


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes under `root` (the lock file aside: it holds the PID of whoever last held it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "rlpt.lock"}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def tripwire(monkeypatch):
    """Replace every job with a function that fails the test: a bad config must be refused before one starts."""
    import rlpt.compare
    import rlpt.gpt_mini.model
    import rlpt.pipeline
    import rlpt.preference.dpo
    import rlpt.preference.reward_model
    import rlpt.sft
    import rlpt.train

    def reached(*a, **k):
        raise AssertionError(f"a bad input reached a job: {a[:1]}")
    for mod, name in [(rlpt.sft, "train_sft"), (rlpt.train, "run_train"), (rlpt.preference.dpo, "run_dpo"),
                      (rlpt.preference.reward_model, "train_rm"), (rlpt.pipeline, "run_pipeline"),
                      (rlpt.compare, "sft_init"), (rlpt.gpt_mini.model, "load_model")]:
        monkeypatch.setattr(mod, name, reached)


def check_fails(argv: list[str], capsys, names: str | None = None) -> str:
    """main(argv) == 2 with one line on stderr (naming `names`, if given)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err[-2000:])
    assert err.count("\n") == 1 and err.endswith("\n"), (argv, err[-2000:])
    assert "Traceback" not in err and err.startswith("rlpt") and len(err) <= MAX_LINE, (argv, err[:2000])
    if names is not None:
        assert names[:150] in err or repr(names)[1:-1][:150] in err, (argv, names, err)
    return err


# -- 1. bad overrides from every job's schema ---------------------------------------------------------------
def test_fuzz_overrides(base_run, tmp_path, capsys, tripwire):
    from rlpt.pipeline import PipelineJob
    from rlpt.preference.dpo import DPOJob
    from rlpt.preference.reward_model import RMJob
    from rlpt.train import TrainJob
    rng = random.Random(SEED)
    out = base_run.parent
    before, files = snapshot(base_run), tree(out)
    n = 0
    for cmd, cls, count in [("sft", SFTJob, 60), ("train", TrainJob, 60), ("dpo", DPOJob, 40), ("rm", RMJob, 30),
                            ("pipeline", PipelineJob, 30)]:
        for overrides, names in schema_cases(rng, cls, count):
            rest = [f"run.out_dir={out}", "run.name=base", *overrides] + (["--resume"] if rng.random() < 0.5 else [])
            if rng.random() < 0.3:
                rng.shuffle(rest)                          # overrides and --resume in any order
            check_fails([cmd, *rest], capsys, names)
            n += 1
    for overrides, names in schema_cases(rng, EvalJob, 25):        # rlpt eval: task.* and eval.* overrides
        check_fails(["eval", str(base_run), *overrides, *(["--pass-k", "2"] if rng.random() < 0.5 else [])],
                    capsys, names)
        n += 1
    for bad in ALGORITHM_BAD:
        check_fails(["train", f"run.out_dir={out}", *bad.split()], capsys, "algorithm" if "rollout" not in bad else "k")
        check_fails(["compare", "--algos", "grpo", f"run.out_dir={out}", *bad.split()], capsys)
        n += 2
    assert n >= 260
    assert snapshot(base_run) == before and tree(out) == files


# -- 2. bad YAML recipes --------------------------------------------------------------------------------------
def recipe_cases(rng: random.Random, n: int) -> list[tuple[bytes, str]]:
    """n (recipe bytes, what the error must say)."""
    good = Path("recipes/sft_arith.yaml").read_bytes()
    cases = []
    for _ in range(n):
        kind = rng.choice(["encoding", "duplicate", "syntax", "scalar", "bomb", "unknown", "value"])
        if kind == "encoding":
            i = rng.randrange(len(good))
            cases.append((good[:i] + rng.choice([b"\xff", b"\xe9", b"\xc3\x28", b"\x80"]) + good[i:], "not UTF-8"))
        elif kind == "duplicate":
            sec = rng.choice(["sft", "eval", "run", "model", "task"])
            cases.append((good + f"\n{sec}:\n  x: 1\n".encode(), "appears twice"))
        elif kind == "syntax":
            cases.append((good + rng.choice([b"\nsft: [1, 2\n", b"\n  bad indent: : :\n", b"\n- item\n", b"\n\t"]),
                          "not valid YAML"))
        elif kind == "scalar":
            cases.append((rng.choice([b"just text\n", b"- 1\n- 2\n", b"3\n"]), "must hold a mapping"))
        elif kind == "bomb":
            rows = ['a: &a ["' + "x" * rng.randint(10, 40) + '"]']
            for prev, name in zip("abcdefg", "bcdefgh"):
                rows.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
            cases.append(("\n".join(rows + ["sft:", "  steps: *h"]).encode(), "sft.steps"))
        elif kind == "unknown":
            cases.append((good + f"\n{rng.choice(['sfft', 'evall', 'modle'])}:\n  steps: 3\n".encode(),
                          "unknown config key"))
        else:   # a bad value in place of a good one in the recipe's sft section
            line, bad, key = rng.choice([("  steps: 600", "  steps: .inf", "sft.steps"),
                                         ("  steps: 600", "  steps: -3", "sft.steps"),
                                         ("  batch_size: 64", "  batch_size: [1]", "sft.batch_size"),
                                         ("    lr: 0.003", "    lr: .nan", "sft.optim.lr"),
                                         ("  format: direct", "  format: json", "sft.format")])
            cases.append((good.replace(line.encode(), bad.encode(), 1), key))
    return cases


def test_fuzz_recipes(base_run, tmp_path, capsys, tripwire):
    rng = random.Random(SEED + 1)
    out = base_run.parent
    before, files = snapshot(base_run), tree(out)
    for i, (data, says) in enumerate(recipe_cases(rng, 60)):
        recipe = tmp_path / f"r{i}.yaml"
        recipe.write_bytes(data)
        cmd = "sft" if says.startswith("sft.") else rng.choice(["sft", "sft", "train", "pipeline"])
        check_fails([cmd, str(recipe), f"run.out_dir={out}", "run.name=base", *(["--resume"] if i % 2 else [])],
                    capsys, says)
    assert snapshot(base_run) == before and tree(out) == files


# -- 3. usage mistakes ------------------------------------------------------------------------------------
def test_fuzz_usage(base_run, capsys, tripwire):
    rng = random.Random(SEED + 2)
    cases = [["eval", str(base_run), "--pass-k", v] for v in ("-1", "-7", "1.5", "two", "", "0x3")]
    cases += [["eval", str(base_run), "--split", "test"], ["eval", str(base_run), "--format", "json"], ["eval"],
              ["bogus"], ["SFT"], ["sft", "--bogus"], ["train", "--resumee"], ["sft", "a.yaml", "b.yaml"],
              ["eval", str(base_run), "stray"], ["compare", "--algos"], ["dpo", "-x"]]
    for _ in range(15):
        flag = "--x" + "".join(rng.choice("abcxyz-") for _ in range(rng.randint(1, 8)))   # no prefix of an option
        cases.append([rng.choice(["sft", "train", "dpo", "rm", "pipeline"]), f"{flag}", "sft.steps=3"])
    for argv in cases:
        check_fails(argv, capsys)
    assert len(cases) >= 30


# -- 4. bad pair files, checkpoints and run folders, end to end (no tripwire: these are found at run time) ------
def test_fuzz_runtime_inputs(base_run, tmp_path, capsys):
    from rlpt.preference.reward_model import RewardModel
    from rlpt.run import Run
    out = tmp_path / "out"
    out.mkdir()
    shape = model_overrides(SFT_SHAPE)
    before = snapshot(base_run)
    rm = RewardModel(tiny_gpt(**{k: v for k, v in SFT_SHAPE.items()}), TOK.pad_id)   # an RM checkpoint
    rm_run = Run(tmp_path, "rm_ck", load_config(SFTJob, None, []))
    rm_run.save(1, rm, rm.meta(), {"step": 1})
    rm_run.close()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    pairs = pair_file_cases(random.Random(SEED + 3), tmp_path, 8)
    cases = []
    for f, says in pairs:
        cases.append((["dpo", *shape, f"init_from={base_run}", f"dpo.pairs.file={f}", f"run.out_dir={out}"], says))
        cases.append((["rm", *shape, f"init_from={base_run}", f"rm.pairs.file={f}", f"run.out_dir={out}"], says))
    for init in (tmp_path / "missing", a_file, empty_dir, rm_run.dir):
        cases.append((["dpo", *shape, f"init_from={init}", f"run.out_dir={out}"], str(init)))
        cases.append((["eval", str(init)], str(init)))
    cases += [(["sft", *TINY, f"run.out_dir={a_file}"], str(a_file)),
              (["eval", str(base_run), "task.max_operands=12", "task.max_value=99"], "model.max_seq_len=32")]
    for argv, says in cases:
        check_fails(argv, capsys, says)
    assert snapshot(base_run) == before
    assert not any(out.iterdir()), sorted(tree(out))          # no run folder left behind by a failed start
    assert a_file.read_text() == "x" and not any(empty_dir.iterdir())


def pair_file_cases(rng: random.Random, tmp_path: Path, n: int) -> list[tuple[Path, str]]:
    files = []
    for i, (line, says) in enumerate(bad_pair_lines(rng, n)):
        f = tmp_path / f"pairs{i}.jsonl"
        f.write_bytes(json.dumps({"prompt": "<1+2>", "chosen": "3#", "rejected": "4#"}).encode() + b"\n" + line)
        files.append((f, says))
    return files


def bad_pair_lines(rng: random.Random, n: int) -> list[tuple[bytes, str]]:
    """n (a bad JSONL line, what the error must say)."""
    ok = {"prompt": "<1+2>", "chosen": "3#", "rejected": "4#"}
    out = []
    for _ in range(n):
        kind = rng.choice(["json", "type", "missing", "field_type", "char", "pad", "empty", "utf8", "huge", "deep"])
        row = dict(ok)
        field = rng.choice(["prompt", "chosen", "rejected"])
        if kind == "json":
            out.append((rng.choice([b"{", b"{'prompt': 1}", b"nope", b'{"prompt": "<1>",}']), "not valid JSON"))
        elif kind == "type":
            out.append((rng.choice([b"[1, 2]", b'"text"', b"3", b"null"]), "expected a JSON object"))
        elif kind == "missing":
            del row[field]
            out.append((json.dumps(row).encode(), f"missing field '{field}'"))
        elif kind == "field_type":
            row[field] = rng.choice([3, None, ["a"], {"x": 1}, 1.5])
            out.append((json.dumps(row).encode(), f"field '{field}' must be a string"))
        elif kind == "char":
            row[field] = row[field] + rng.choice(["!", "A", "é", "\n", "[", "€"])
            out.append((json.dumps(row).encode(), f"of field '{field}') is not in the arithmetic alphabet"))
        elif kind == "pad":
            row[field] = row[field][:1] + "\x00" + row[field][1:]
            out.append((json.dumps(row).encode(), "the padding character"))
        elif kind == "empty":
            row[field] = ""
            out.append((json.dumps(row).encode(), "must be non-empty strings"))
        elif kind == "utf8":
            out.append((json.dumps(row).encode()[:-3] + b"\xff\xfe" + b'"}', "not UTF-8"))
        elif kind == "huge":
            row[field] = "Z" * rng.randint(100_000, 2_000_000)   # quoted at most ~200 chars, whatever its size
            out.append((json.dumps(row).encode(), "is not in the arithmetic alphabet"))
        else:
            depth = rng.randint(100_000, 300_000)
            out.append((b"[" * depth + b"]" * depth, "not valid JSON"))
    return out


def test_fuzz_pair_files(tmp_path):
    """The pairs reader alone (what `rlpt dpo` and `rlpt rm` call first): many more cases, cheaply."""
    rng = random.Random(SEED + 4)
    n = 0
    for i, (line, says) in enumerate(bad_pair_lines(rng, 80)):
        f = tmp_path / f"p{i}.jsonl"
        good = json.dumps({"prompt": "<1+2>", "chosen": "3#", "rejected": "4#"}).encode()
        at = rng.randint(0, 3)
        f.write_bytes(b"\n".join([good] * at + [line] + [good]) + b"\n")
        with pytest.raises(PreferenceDataError) as e:
            load_pairs(f, TOK, 32)
        msg = str(e.value)
        assert says in msg and "\n" not in msg and len(msg) <= 600, (says, msg[:1000])
        assert f"{f}:{at + 1}:" in msg or "not UTF-8" in msg
        n += 1
    assert n == 80


# -- 5. the engine API -------------------------------------------------------------------------------------
def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# what SamplingParams accepts, field by field (vLLM's meaning; top_k -1 = off)
SAMPLING_OK = {
    "n": lambda x: _int(x) and x >= 1,
    "temperature": lambda x: _num(x) and 0 <= x < float("inf"),
    "top_p": lambda x: _num(x) and 0 < x <= 1,
    "top_k": lambda x: _int(x) and x >= -1,
    "max_tokens": lambda x: _int(x) and x >= 1,
    "stop": lambda x: x is None or (isinstance(x, str) and x != "") or
    (isinstance(x, list) and all(isinstance(s, str) and s for s in x)),
    "stop_token_ids": lambda x: x is None or (isinstance(x, list) and all(_int(t) and t >= 0 for t in x)),
    "ignore_eos": lambda x: isinstance(x, bool),
    "seed": lambda x: x is None or (_int(x) and 0 <= x < 2 ** 62),
    "logprobs": lambda x: x is None or (_int(x) and x >= 0),
}


def test_fuzz_engine_api():
    from rlpt.engine import LLM, SamplingParams
    rng = random.Random(SEED + 5)
    llm = LLM(tiny_gpt(max_seq_len=16), TOK, num_blocks=8, block_size=4)
    junk = [float("nan"), float("inf"), -float("inf"), -1, -1.5, 0, 0.5, "1", None, [1], [-1], ["#"], [""], {"a": 1},
            True, 2 ** 70, 1.5, "", "#"]
    n = 0
    for _ in range(120):
        field, value = rng.choice(sorted(SAMPLING_OK)), rng.choice(junk)
        if SAMPLING_OK[field](value):
            SamplingParams(**{field: value})       # the oracle says valid: accepted
            continue
        with pytest.raises(ValueError) as e:
            SamplingParams(**{field: value})
        assert str(e.value).startswith(f"SamplingParams.{field} ") and "\n" not in str(e.value), str(e.value)
        n += 1
    prompts = [[], [""], "<1+2>" * 10, "ABC", [[999]], [[1.5]], [["a"]], [[1, None]], 5, None, ["Z" * 10 ** 6],
               [list(range(1, 17))]]
    for p in prompts:
        with pytest.raises(ValueError) as e:
            llm.generate(p, SamplingParams(max_tokens=2))
        msg = str(e.value)
        assert msg.startswith(("prompt 0", "generate()")) and "\n" not in msg and len(msg) < 500, msg[:600]
        n += 1
    sp = SamplingParams()
    sp.temperature = float("nan")            # changed after construction: generate checks again
    with pytest.raises(ValueError, match="SamplingParams.temperature must be a finite number"):
        llm.generate(["<1+2>"], sp)
    llm.check_invariants()                   # no block leaked by any refused call
    assert n >= 60


# -- 6. a real process: no traceback on stderr ------------------------------------------------------------
def test_no_traceback_in_real_processes(base_run, tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("sft:\n  steps: 3\n  steps: 4\n")
    rlpt = Path(sys.executable).parent / "rlpt"
    for argv, says in [(["sft", str(bad)], "appears twice"),
                       (["eval", str(base_run), "--pass-k", "-1", "eval.size=3"], "--pass-k")]:
        r = subprocess.run([str(rlpt), *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (argv, r.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.yaml"]     # no runs/ folder appeared
