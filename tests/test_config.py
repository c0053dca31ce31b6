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
