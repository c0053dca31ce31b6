"""Typed configs: every mistake is a ConfigError that names the key (or the file) and what to do."""
from __future__ import annotations

import re

import pytest

from rlpt.config import ConfigError, ModelConfig, dump_config, load_config, parse_override
from rlpt.sft import SFTJob


def test_defaults_and_recipe_agree():
    job = load_config(SFTJob)
    assert job.sft.steps == 600 and job.model.d_model == 128 and job.sft.optim.betas == (0.9, 0.95)
    assert load_config(SFTJob, "recipes/sft_arith.yaml") == job   # the recipe writes the defaults out


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as e:
        load_config(SFTJob, None, ["sft.stepz=1"])
    msg = str(e.value)
    assert "unknown config key 'sft.stepz'" in msg and "Did you mean 'sft.steps'?" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'sft.optim.lrr'.*Did you mean 'sft.optim.lr'"):
        load_config(SFTJob, None, ["sft.optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(SFTJob, None, ["modle.n_layer=2"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"config key 'sft.steps'.*'many'"):
        load_config(SFTJob, None, ["sft.steps=many"])
    with pytest.raises(ConfigError, match=r"config key 'sft.format'"):
        load_config(SFTJob, None, ["sft.format=json"])


def test_out_of_range_names_key():
    with pytest.raises(ConfigError, match=r"config key 'sft.steps'.*greater than or equal to 1.*got 0"):
        load_config(SFTJob, None, ["sft.steps=0"])
    with pytest.raises(ConfigError, match=r"config key 'task.heldout_frac'"):
        load_config(SFTJob, None, ["task.heldout_frac=1.5"])
    with pytest.raises(ConfigError, match=r"config key 'sft.optim.lr'"):
        load_config(SFTJob, None, ["sft.optim.lr=-1"])


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(SFTJob, None, ["sft.steps=0", "eval.sise=3"])
    assert "sft.steps" in str(e.value) and "eval.sise" in str(e.value) and "eval.size" in str(e.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"(?s){re.escape(str(bad))}.*not valid YAML"):
        load_config(SFTJob, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match=rf"(?s){re.escape(str(scalar))}.*must hold a mapping"):
        load_config(SFTJob, scalar)
    bad_key = tmp_path / "key.yaml"
    bad_key.write_text("sft:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"(?s){re.escape(str(bad_key))}.*unknown config key 'sft.stepz'"):
        load_config(SFTJob, bad_key)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"(?s){re.escape(str(missing))}.*does not exist"):
        load_config(SFTJob, missing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTJob, tmp_path)   # a folder is not a config file


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"'sft.steps' is not of the form key.sub=value"):
        load_config(SFTJob, None, ["sft.steps"])
    with pytest.raises(ConfigError, match="'sft' is a value, not a section"):
        load_config(SFTJob, None, ["sft=3", "sft.steps=2"])


def test_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("sft:\n  steps: 50\n  optim:\n    lr: 0.01\n")
    job = load_config(SFTJob, f, ["sft.optim.warmup_steps=7", "sft.optim.betas=[0.8, 0.9]", "run.name=x y",
                                  "model.tie_embeddings=false", "init_from=null"])
    assert job.sft.steps == 50 and job.sft.optim.lr == 0.01          # file, deep-merged with defaults
    assert job.sft.optim.warmup_steps == 7 and job.sft.optim.schedule == "cosine"
    assert job.sft.optim.betas == (0.8, 0.9) and job.run.name == "x y"
    assert job.model.tie_embeddings is False and job.init_from is None
    assert load_config(SFTJob, f, ["sft.steps=9"]).sft.steps == 9   # command line beats the file
    assert parse_override("a.b=c=d") == (["a", "b"], "c=d")
    assert parse_override("a=") == (["a"], "")


def test_dump_round_trip(tmp_path):
    job = load_config(SFTJob, None, ["sft.steps=3", "model.n_kv_head=2"])
    f = tmp_path / "config.yaml"
    f.write_text(dump_config(job))
    assert load_config(SFTJob, f) == job


def test_model_shape_errors():
    with pytest.raises(ConfigError, match=r"model.d_model \(100\) must be divisible by model.n_head \(3\)"):
        load_config(SFTJob, None, ["model.d_model=100", "model.n_head=3", "model.n_kv_head=1"])
    with pytest.raises(ConfigError, match="must be divisible by model.n_kv_head"):
        load_config(SFTJob, None, ["model.n_kv_head=3"])
    with pytest.raises(ValueError):
        ModelConfig(d_model=130)


def test_task_range_errors():
    with pytest.raises(ConfigError, match="task.max_operands must be >= task.min_operands"):
        load_config(SFTJob, None, ["task.min_operands=5"])
    with pytest.raises(ConfigError, match="task.max_value must be >= task.min_value"):
        load_config(SFTJob, None, ["task.min_value=10"])


def test_assignment_is_validated():
    job = load_config(SFTJob)
    with pytest.raises(ValueError):
        job.sft.steps = 0


# -- issue 13 §3: every bad input gets one clear line ------------------------------------------------------
def _one_line_error(fn, *args) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    return msg


def test_non_utf8_recipe_names_the_file_and_byte(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("sft:\n  steps: 3\n# caf\xe9\n".encode("latin-1"))
    msg = _one_line_error(load_config, SFTJob, f)
    assert msg == f"config file {str(f)!r} is not UTF-8 text (byte 0xe9 on line 3): save it as UTF-8"


def test_duplicate_yaml_keys_are_refused(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("sft:\n  steps: 3\n  optim:\n    lr: 0.1\n  steps: 4\n")
    msg = _one_line_error(load_config, SFTJob, f)
    assert msg == f"config file {str(f)!r}: key 'steps' appears twice (lines 2 and 5): keep one"
    top = tmp_path / "top.yaml"
    top.write_text("sft: {steps: 3}\nsft: {steps: 4}\n")
    assert "key 'sft' appears twice (lines 1 and 2)" in _one_line_error(load_config, SFTJob, top)
    assert "key 'lr' appears twice" in _one_line_error(load_config, SFTJob, None, ["sft.optim={lr: 1, lr: 2}"])
    ok = tmp_path / "ok.yaml"   # the same key in two sections is not a duplicate
    ok.write_text("sft: {steps: 3}\neval: {every: 3}\nrun: {name: x}\n")
    assert load_config(SFTJob, ok).sft.steps == 3


@pytest.mark.parametrize("override, key", [
    ("sft.optim.lr=.inf", "sft.optim.lr"), ("sft.optim.lr=inf", "sft.optim.lr"), ("sft.optim.lr=-.inf", "sft.optim.lr"),
    ("sft.optim.lr=.nan", "sft.optim.lr"), ("model.rope_theta=1e999", "model.rope_theta"),
    ("sft.optim.betas=[.nan, 0.9]", "sft.optim.betas.0"), ("task.heldout_frac=.nan", "task.heldout_frac"),
    ("sft.optim.weight_decay=.inf", "sft.optim.weight_decay")])
def test_non_finite_numbers_name_the_key(override, key):
    msg = _one_line_error(load_config, SFTJob, None, [override])
    assert f"config key '{key}'" in msg and "finite" in msg


def test_non_finite_numbers_in_the_algorithm_section():
    # AlgorithmConfig is not a config.Section: the check after validation reaches it
    from rlpt.train import load_train_job
    msg = _one_line_error(load_train_job, None, ["algorithm.beta=.inf"])
    assert "config key 'algorithm.beta' is inf: every number must be finite" in msg
    msg = _one_line_error(load_train_job, None, ["algorithm.clip_eps_high=nan"])   # NaN > 0 is false: the range says so
    assert msg.endswith("invalid algorithm config: config key 'algorithm.clip_eps_high': Input should be greater "
                        "than 0 (got 'nan')")


def test_adam_betas_seed_and_64_bit_ints():
    assert "sft.optim: betas must both be in [0, 1), got [1.5, 0.9]" in \
        _one_line_error(load_config, SFTJob, None, ["sft.optim.betas=[1.5, 0.9]"])
    assert "got [0.9, -0.1]" in _one_line_error(load_config, SFTJob, None, ["sft.optim.betas=[0.9, -0.1]"])
    assert load_config(SFTJob, None, ["sft.optim.betas=[0.0, 0.999]"]).sft.optim.betas == (0.0, 0.999)
    msg = _one_line_error(load_config, SFTJob, None, ["run.seed=99999999999999999999"])
    assert "config key 'run.seed': Input should be less than 4294967296" in msg
    assert "config key 'run.seed'" in _one_line_error(load_config, SFTJob, None, ["run.seed=-1"])
    assert load_config(SFTJob, None, [f"run.seed={2 ** 32 - 1}"]).run.seed == 2 ** 32 - 1
    msg = _one_line_error(load_config, SFTJob, None, [f"sft.steps={2 ** 64}"])
    assert msg.endswith(f"config key 'sft.steps' is {2 ** 64}: integers must fit in 64 bits")
    assert "may not hold a NUL byte" in _one_line_error(load_config, SFTJob, None, ["run.name=a\0b"])


def test_errors_are_one_line_and_quote_at_most_200_chars(tmp_path):
    # a 600-byte alias bomb expands to millions of characters; the error quotes a bounded preview
    bomb = tmp_path / "bomb.yaml"
    rows = ['a: &a ["xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "yyyyyyyyyyyyyyyyyyyyyyyy"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    bomb.write_text("\n".join(rows) + "\nsft:\n  steps: *i\n")
    assert len(bomb.read_bytes()) < 700
    msg = _one_line_error(load_config, SFTJob, bomb)
    assert "config key 'sft.steps': Input should be a valid integer" in msg and len(msg) < 800
    assert "unknown config key 'a'; unknown config key 'b'" in msg
    assert msg.endswith("; and 5 more")   # ten problems (nine unknown keys a..i): five listed, the rest counted
    long = "9" * 5000
    msg = _one_line_error(load_config, SFTJob, None, [f"sft.steps={long}"])
    assert "... (5000 chars)" in msg and len(msg) < 500
    msg = _one_line_error(load_config, SFTJob, None, [f"x{long}=1"])
    assert "unknown config key" in msg and len(msg) < 500
    several = _one_line_error(load_config, SFTJob, None, ["sft.steps=0", "eval.sise=3"])
    assert several.startswith("invalid config (defaults + overrides): config key 'sft.steps'")
    assert "; unknown config key 'eval.sise'. Did you mean 'eval.size'?" in several


def test_malformed_overrides():
    assert "has an empty key part" in _one_line_error(load_config, SFTJob, None, ["=3"])
    assert "has an empty key part" in _one_line_error(load_config, SFTJob, None, ["sft..steps=3"])


def test_prompt_must_fit_the_context():
    msg = _one_line_error(load_config, SFTJob, None,
                          ["task.max_operands=12", "task.max_value=99", "model.max_seq_len=32"])
    assert msg.endswith("the longest prompt has 37 tokens (task.max_operands=12, task.max_value=99) but "
                        "model.max_seq_len=32 leaves no room to answer: raise model.max_seq_len or lower "
                        "task.max_operands / task.max_value")
    assert load_config(SFTJob, None, ["task.max_operands=4", "task.max_value=9", "model.max_seq_len=12"])  # 9 + 3
    # SFT trains on the whole demonstration: <9+9+9+9> and 36# are 12 tokens, its CoT 9 + 23 = 32
    msg = _one_line_error(load_config, SFTJob, None, ["model.max_seq_len=11"])
    assert msg.endswith("sft.format=direct: the longest demonstration (<9+9+9+9> and its answer) has 12 tokens but "
                        "model.max_seq_len=11: raise model.max_seq_len or lower task.max_operands / task.max_value")
    assert load_config(SFTJob, None, ["model.max_seq_len=32", "sft.format=cot"]).sft.format == "cot"
    assert "has 32 tokens" in _one_line_error(load_config, SFTJob, None, ["model.max_seq_len=31", "sft.format=cot"])
    from rlpt.train import load_train_job
    # RL's own SFT start (cot by default) is checked; an init_from is not trained here
    msg = _one_line_error(load_train_job, None, ["model.max_seq_len=31"])
    assert "sft.format=cot: the longest demonstration" in msg
    assert load_train_job(None, ["model.max_seq_len=31", "init_from=runs/x"]).model.max_seq_len == 31
    from rlpt.pipeline import load_pipeline_job
    msg = _one_line_error(load_pipeline_job, None, ["model.max_seq_len=11"])   # the 5-operand hard slice: 11
    assert "the longest prompt has 11 tokens (hard.operands=5" in msg
    assert "cot.format=cot: the longest demonstration" in _one_line_error(load_pipeline_job, None,
                                                                           ["model.max_seq_len=31"])


def test_rm_heldout_file_needs_file():
    from rlpt.preference.reward_model import RMJob
    msg = _one_line_error(load_config, RMJob, None, ["rm.pairs.heldout_file=held.jsonl"])
    assert "rm.pairs.heldout_file is only read with rm.pairs.file" in msg
    job = load_config(RMJob, None, ["rm.pairs.heldout_file=held.jsonl", "rm.pairs.file=train.jsonl"])
    assert job.rm.pairs.heldout_file == "held.jsonl"
