"""`rlpt pipeline`: three stages chained through their checkpoints, RL on a task wider than SFT's, one report,
resume, bad input."""
import json

import pytest
import torch
import yaml

from rlpt.checkpoint import latest_checkpoint, load_state
from rlpt.cli import main
from rlpt.config import ConfigError
from rlpt.framework.environment import ArithmeticEnv
from rlpt.framework.evaluate import evaluate
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.task import make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.pipeline import STAGES, load_pipeline_job, run_pipeline
from rlpt.train import TrainJob, TrainStage

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.d_model=32", "model.d_ff=64",
        "model.max_seq_len=48", "task.max_operands=3", "task.max_value=4", "hard.operands=4", "rl.max_operands=5",
        "rl.env.curriculum.start_operands=4", "rl.env.curriculum.pool=16",
        "cot.steps=30", "cot.batch_size=16", "cot.optim.lr=3e-3",
        "dpo.steps=3", "dpo.batch_size=4", "dpo.pairs.prompts=32", "dpo.pairs.k=4", "dpo.pairs.max_tokens=24",
        "rl.steps=3", "rl.rollout.k=4", "rl.rollout.prompts_per_step=4", "rl.rollout.max_tokens=32",
        "rl.eval_every=3", "eval.size=16", "eval.max_tokens=24", "run.progress=false"]


def job(tmp_path, *overrides):
    return load_pipeline_job(None, [*TINY, f"run.out_dir={tmp_path / 'runs'}", *overrides])


def test_pipeline_chains_three_stages_and_reports_each(tmp_path):
    j = job(tmp_path)
    assert j.slices == [4, 5]
    root, rows = run_pipeline(j)
    assert [r["stage"] for r in rows] == list(STAGES) == ["1_cot", "2_dpo", "3_rlvr"]
    steps = {"1_cot": 30, "2_dpo": 3, "3_rlvr": 3}
    for stage in STAGES:
        ck = latest_checkpoint(root / stage)
        assert ck is not None and load_state(ck)["step"] == steps[stage], stage
    # each stage starts from the one before: its config names the previous stage's final checkpoint
    for prev, stage in zip(STAGES, STAGES[1:]):
        cfg = (root / stage / "config.yaml").read_text()
        assert str(latest_checkpoint(root / prev)) in cfg, stage
    # every row is the one evaluator on that stage's checkpoint: greedy and seeded samples, each slice
    env = ArithmeticEnv(make_task(j.task), tokenizer=CharTokenizer())
    for r in rows:
        model = load_model(r["checkpoint"])
        ev = evaluate(model, env, env.heldout(16), 24, k=j.final_eval.samples, temperature=1.0, seed=j.run.seed)
        assert (r["acc/heldout"], r["acc/heldout_sampled"], r["len/heldout"]) == (ev["acc"], ev["acc_sampled"],
                                                                                  ev["len"])
        for n in (4, 5):
            hard = ArithmeticEnv(make_task(j.task.model_copy(update={"min_operands": n, "max_operands": n})),
                                 tokenizer=CharTokenizer())
            h = evaluate(model, hard, hard.heldout(16), 8 * n, k=j.final_eval.samples, temperature=1.0,
                         seed=j.run.seed)
            assert (r[f"acc/{n}_ops"], r[f"acc/{n}_ops_sampled"]) == (h["acc"], h["acc_sampled"])
    # the RL stage: GRPO on the task widened to rl.max_operands, prompts from the curriculum's operand ramp
    cfg = yaml.safe_load((root / "3_rlvr" / "config.yaml").read_text())
    assert (cfg["algorithm"]["name"], cfg["task"]["max_operands"], cfg["env"]["name"]) == ("grpo", 5, "curriculum")
    assert cfg["env"]["curriculum"]["start_operands"] == 4 and cfg["model"]["rope_theta"] == 1e30
    assert yaml.safe_load((root / "1_cot" / "config.yaml").read_text())["task"]["max_operands"] == 3
    trained = [json.loads(x) for x in (root / "3_rlvr" / "metrics.jsonl").read_text().splitlines()]
    assert any("curriculum/width" in r for r in trained)
    report = (root / "report.md").read_text()
    assert all(s in report for s in STAGES) and "| 4 operands | 5 operands |" in report
    assert "sampled (4 per problem, T=1)" in report
    assert (root / "pipeline.png").exists()
    # the weights really changed at every stage that took an optimizer step (the RL stage may skip steps
    # whose groups are all-equal: then its weights are bit-identical to the DPO stage's, by design)
    sds = {s: load_model(latest_checkpoint(root / s)).state_dict() for s in STAGES}
    for prev, stage in zip(STAGES, STAGES[1:]):
        same = all(torch.equal(a, b) for a, b in zip(sds[prev].values(), sds[stage].values()))
        if stage == "3_rlvr":
            assert same == all(r.get("step/skipped", 1.0) == 1.0 for r in trained if "reward/mean" in r)
        else:
            assert not same, stage


def test_pipeline_resume_skips_finished_stages(tmp_path, capsys):
    j = job(tmp_path)
    root, first = run_pipeline(j)
    before = {s: (latest_checkpoint(root / s) / "model.safetensors").read_bytes() for s in STAGES}
    capsys.readouterr()
    root, again = run_pipeline(j, resume=True)
    out = capsys.readouterr().out
    assert all(f"{s} already finished" in out for s in STAGES)
    assert {s: (latest_checkpoint(root / s) / "model.safetensors").read_bytes() for s in STAGES} == before
    assert [r["seconds"] for r in again] == [r["seconds"] for r in first] and all(r["seconds"] > 0 for r in first)
    # same weights, same evaluation (the sampled one draws from its own seeded generator)
    assert [(r["acc/heldout"], r["acc/heldout_sampled"], r["acc/5_ops_sampled"]) for r in again] == \
        [(r["acc/heldout"], r["acc/heldout_sampled"], r["acc/5_ops_sampled"]) for r in first]
    # without --resume an existing pipeline folder is an error that changes nothing
    with pytest.raises(FileExistsError, match="--resume"):
        run_pipeline(j)
    assert {s: (latest_checkpoint(root / s) / "model.safetensors").read_bytes() for s in STAGES} == before


def test_each_stage_is_its_jobs_schema_with_what_the_stages_share(tmp_path):
    j = job(tmp_path, "eval.every=7", "rl.trainer.mini_batches=1")
    shared = {"model": j.model, "init_from": "/ck"}
    for stage in STAGES:
        s = j.stage_job(stage, "/ck")
        assert {k: getattr(s, k) for k in shared} == shared and s.eval.size == j.eval.size == 16
        assert (s.run.out_dir, s.run.name, s.run.threads) == (str(tmp_path / "runs" / "pipeline"), stage, 1)
    assert j.stage_job("1_cot", None).sft == j.cot and j.stage_job("1_cot", None).task == j.task
    assert j.stage_job("2_dpo", None).dpo == j.dpo and j.stage_job("2_dpo", None).eval.every == 7
    assert j.stage_job("2_dpo", None).task == j.task
    rl = j.stage_job("3_rlvr", None)
    assert isinstance(rl, TrainJob) and rl.eval.every == 3              # rl.eval_every, the rest the pipeline's
    assert rl.task == j.task.model_copy(update={"max_operands": 5})       # widened to rl.max_operands
    assert rl.eval.max_tokens == 40 and rl.env == j.rl.env                # room for a 5-operand chain
    keys = TrainStage.model_fields                                    # every step key: the pipeline's rl section's
    assert {k: getattr(rl, k) for k in keys} == {k: getattr(j.rl, k) for k in keys}
    assert rl.trainer.mini_batches == 1 and rl.algorithm.name == "grpo"


def test_the_defaults_are_the_measured_recipe(tmp_path):
    j = load_pipeline_job(None, [f"run.out_dir={tmp_path}"])
    assert (j.task.max_operands, j.hard.operands, j.rl.max_operands, j.slices) == (4, 5, 6, [5, 6])
    assert (j.model.rope, j.model.operand_index, j.cot.operand_offset, j.cot.steps) == (False, 16, 8, 1500)
    assert (j.dpo.steps, j.dpo.pairs.temperature, j.rl.steps, j.rl.rollout.temperature) == (30, 1.6, 200, 1.0)
    c = j.rl.env.curriculum
    assert (j.rl.env.name, c.start_operands, c.threshold, c.probe) == ("curriculum", 5, 0.8, 4)


def test_the_rl_stage_takes_its_algorithms_own_defaults(tmp_path):
    assert job(tmp_path, "rl.algorithm.name=ppo").rl.trainer.epochs == 4            # PPO's trainer_defaults
    assert job(tmp_path, "rl.algorithm.name=ppo", "rl.trainer.epochs=2").rl.trainer.epochs == 2   # the user wins
    assert job(tmp_path).rl.trainer.epochs == 1
    assert type(job(tmp_path, "rl.algorithm.name=rloo").rl.algorithm).__qualname__ == "RLOO.Config"   # no DAPO keys


def test_pipeline_bad_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="hard.operands"):
        job(tmp_path, "hard.operands=3")
    with pytest.raises(ConfigError, match="rl.max_operands"):
        job(tmp_path, "rl.max_operands=3")
    with pytest.raises(ConfigError, match="rl.env.curriculum.start_operands"):
        job(tmp_path, "rl.env.curriculum.start_operands=6")
    with pytest.raises(ConfigError, match="rl.max_operands"):
        job(tmp_path, "rl.max_operands=30")                  # its prompt does not fit model.max_seq_len=48
    with pytest.raises(ConfigError, match="rl.steps"):
        job(tmp_path, "rl.stepz=3")
    with pytest.raises(ConfigError, match="unknown algorithm|grpoo"):
        job(tmp_path, "rl.algorithm.name=grpoo")
    with pytest.raises(ConfigError, match="dpo.method"):
        job(tmp_path, "dpo.method=dpp")
    with pytest.raises(ConfigError, match="key 'rl.algorithm.bet' for grpo. Did you mean 'rl.algorithm.beta'"):
        job(tmp_path, "rl.algorithm.bet=1")          # the algorithm's own keys, named as the pipeline spells them


def test_cli_pipeline(tmp_path, capsys):
    rc = main(["pipeline", *TINY, f"run.out_dir={tmp_path / 'runs'}", "run.name=cli"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3_rlvr" in out and "pipeline folder" in out
    rc = main(["pipeline", *TINY, f"run.out_dir={tmp_path / 'runs'}", "run.name=cli"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
