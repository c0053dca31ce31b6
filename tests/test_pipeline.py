"""`rlpt pipeline`: four stages chained through their checkpoints, one report, resume, bad input."""
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
        "model.max_seq_len=48", "task.max_operands=3", "task.max_value=4", "hard.operands=4",
        "direct.steps=6", "direct.batch_size=16", "cot.steps=30", "cot.batch_size=16", "cot.optim.lr=3e-3",
        "dpo.steps=3", "dpo.batch_size=4", "dpo.pairs.prompts=32", "dpo.pairs.k=4", "dpo.pairs.max_tokens=24",
        "rl.steps=3", "rl.rollout.k=4", "rl.rollout.prompts_per_step=4", "rl.rollout.max_tokens=24",
        "rl.eval_every=3", "eval.size=16", "eval.max_tokens=24", "run.progress=false"]


def job(tmp_path, *overrides):
    return load_pipeline_job(None, [*TINY, f"run.out_dir={tmp_path / 'runs'}", *overrides])


def test_pipeline_chains_four_stages_and_reports_each(tmp_path):
    j = job(tmp_path)
    root, rows = run_pipeline(j)
    assert [r["stage"] for r in rows] == list(STAGES)
    steps = {"1_direct": 6, "2_cot": 30, "3_dpo": 3, "4_rlvr": 3}
    for stage in STAGES:
        ck = latest_checkpoint(root / stage)
        assert ck is not None and load_state(ck)["step"] == steps[stage], stage
    # each stage starts from the one before: its config names the previous stage's final checkpoint
    for prev, stage in zip(STAGES, STAGES[1:]):
        cfg = (root / stage / "config.yaml").read_text()
        assert str(latest_checkpoint(root / prev)) in cfg, stage
    # every row is the one evaluator on that stage's checkpoint: greedy, the seeded samples, the harder slice
    env = ArithmeticEnv(make_task(j.task), tokenizer=CharTokenizer())
    hard = ArithmeticEnv(make_task(j.task.model_copy(update={"min_operands": 4, "max_operands": 4})),
                         tokenizer=CharTokenizer())
    for r in rows:
        model = load_model(r["checkpoint"])
        ev = evaluate(model, env, env.heldout(16), 24, k=j.final_eval.samples, temperature=1.0, seed=j.run.seed)
        got = (r["acc/heldout"], r["acc/heldout_sampled"], r["len/heldout"])
        assert got == (ev["acc"], ev["acc_sampled"], ev["len"])
        assert r["acc/hard"] == evaluate(model, hard, hard.heldout(16), 32)["acc"]
    # the RL stage's config.yaml: DAPO's whole config, resolved against the stage's rollout (max_tokens 24)
    algo = yaml.safe_load((root / "4_rlvr" / "config.yaml").read_text())["algorithm"]
    assert (algo["name"], algo["clip_eps_high"], algo["norm_len"], algo["overlong_max_len"]) == ("dapo", 0.28, 24, 24)
    report = (root / "report.md").read_text()
    assert all(s in report for s in STAGES) and "harder slice, greedy (4 operands)" in report
    assert "sampled (4 per problem, T=1)" in report
    assert (root / "pipeline.png").exists()
    # the weights really changed at every stage that took an optimizer step (the RL stage may skip steps
    # whose groups are all-equal: then its weights are bit-identical to the DPO stage's, by design)
    sds = {s: load_model(latest_checkpoint(root / s)).state_dict() for s in STAGES}
    for prev, stage in zip(STAGES, STAGES[1:]):
        same = all(torch.equal(a, b) for a, b in zip(sds[prev].values(), sds[stage].values()))
        if stage == "4_rlvr":
            trained = [json.loads(x) for x in (root / stage / "metrics.jsonl").read_text().splitlines()]
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
    assert [(r["acc/heldout"], r["acc/heldout_sampled"]) for r in again] == \
        [(r["acc/heldout"], r["acc/heldout_sampled"]) for r in first]
    # without --resume an existing pipeline folder is an error that changes nothing
    with pytest.raises(FileExistsError, match="--resume"):
        run_pipeline(j)
    assert {s: (latest_checkpoint(root / s) / "model.safetensors").read_bytes() for s in STAGES} == before


def test_each_stage_is_its_jobs_schema_with_what_the_stages_share(tmp_path):
    j = job(tmp_path, "eval.every=7", "rl.trainer.mini_batches=1")
    shared = {"model": j.model, "task": j.task, "init_from": "/ck"}
    for stage in STAGES:
        s = j.stage_job(stage, "/ck")
        assert {k: getattr(s, k) for k in shared} == shared and s.eval.size == j.eval.size == 16
        assert (s.run.out_dir, s.run.name, s.run.threads) == (str(tmp_path / "runs" / "pipeline"), stage, 1)
    assert (j.stage_job("1_direct", None).sft, j.stage_job("2_cot", None).sft) == (j.direct, j.cot)
    assert j.stage_job("3_dpo", None).dpo == j.dpo and j.stage_job("3_dpo", None).eval.every == 7
    rl = j.stage_job("4_rlvr", None)
    assert isinstance(rl, TrainJob) and rl.eval.every == 3              # rl.eval_every, the rest the pipeline's
    keys = TrainStage.model_fields                                    # every step key: the pipeline's rl section's
    assert {k: getattr(rl, k) for k in keys} == {k: getattr(j.rl, k) for k in keys}
    assert rl.trainer.mini_batches == 1 and rl.algorithm.name == "dapo" and rl.algorithm.norm_len == 24


def test_the_rl_stage_takes_its_algorithms_own_defaults(tmp_path):
    assert job(tmp_path, "rl.algorithm.name=ppo").rl.trainer.epochs == 4            # PPO's trainer_defaults
    assert job(tmp_path, "rl.algorithm.name=ppo", "rl.trainer.epochs=2").rl.trainer.epochs == 2   # the user wins
    assert job(tmp_path).rl.trainer.epochs == 1
    assert type(job(tmp_path, "rl.algorithm.name=rloo").rl.algorithm).__qualname__ == "RLOO.Config"   # no DAPO keys


def test_pipeline_bad_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="hard.operands"):
        job(tmp_path, "hard.operands=3")
    with pytest.raises(ConfigError, match="rl.steps"):
        job(tmp_path, "rl.stepz=3")
    with pytest.raises(ConfigError, match="unknown algorithm|grpoo"):
        job(tmp_path, "rl.algorithm.name=grpoo")
    with pytest.raises(ConfigError, match="dpo.method"):
        job(tmp_path, "dpo.method=dpp")


def test_cli_pipeline(tmp_path, capsys):
    rc = main(["pipeline", *TINY, f"run.out_dir={tmp_path / 'runs'}", "run.name=cli"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "4_rlvr" in out and "pipeline folder" in out
    rc = main(["pipeline", *TINY, f"run.out_dir={tmp_path / 'runs'}", "run.name=cli"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
