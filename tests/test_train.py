"""`rlpt train`: recipes, run folders, bit-identical resume, bad input, the run-time log-prob check."""
import json

import pytest
import torch
import yaml
from pydantic import BaseModel

from rlpt.checkpoint import CheckpointError, latest_checkpoint
from rlpt.cli import EvalJob, main
from rlpt.config import ConfigError, dump_config
from rlpt.framework.algorithm import ALGORITHMS
from rlpt.framework.controller import LogpMismatchError
from rlpt.pipeline import PipelineJob
from rlpt.sft import SFTJob
from rlpt.train import TrainJob, build, load_train_job, run_train

from conftest import TINY_RL

TINY = TINY_RL   # conftest's RL override list (a tiny CoT SFT start, 4 prompts x 4 samples)


def job(tmp_path, *overrides):
    return load_train_job(None, [*TINY, f"run.out_dir={tmp_path / 'runs'}", *overrides])


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "mem/"))}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_trains_an_sft_start_first_and_leaves_a_run_folder(tmp_path):
    # an easier task than TINY's so that 30 SFT steps give mixed groups (non-degenerate steps) for any seed
    ctl, run, final = run_train(job(tmp_path, "steps=4", "task.max_operands=2", "task.max_value=4"))
    assert (run.dir / "sft" / "checkpoints" / "latest").exists()      # the SFT start, trained first
    assert latest_checkpoint(run.dir).name == "step_00000004"
    written = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert written["algorithm"] == {**ctl.algorithm.cfg.model_dump(), "norm_len": 24}   # resolved: TINY's max_tokens
    r = rows(run.dir)
    assert [x["step"] for x in r if "acc/heldout" in x] == [0, 3, 4]
    needed = {"reward/mean", "reward/std", "acc/train", "loss/pg", "loss/kl", "clip/frac_low", "clip/frac_high",
              "policy/entropy", "ratio/abs_log_mean", "ratio/abs_log_max", "response/len_mean",
              "groups/degenerate_frac", "grad/norm", "check/logp_mismatch"}
    trained = [x for x in r if x.get("step/skipped") == 0.0]
    assert trained and needed <= set(trained[0])
    full = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    times = next(x for x in full if x.get("step/skipped") == 0.0)
    assert {"time/rollout", "time/verify", "time/ref", "time/train", "time/sync"} <= set(times)
    assert final["acc/heldout_start"] == r[0]["acc/heldout"]


def test_rl_resume_is_bit_identical(tmp_path):
    # run.seed=2: steps 4 and 5 have mixed groups (the multiset split's draws left 4-6 all degenerate at seed 0)
    straight = job(tmp_path, "run.name=straight", "steps=6", "ckpt_every=3", "run.seed=2")
    ctl_a, run_a, _ = run_train(straight)
    init = str(run_a.dir / "sft")
    # a crash after step 4: rerun to 6 with the step-3 checkpoint only
    # a crash after step 5: the run's metrics went past its last checkpoint (step 3), which resume truncates.
    # The crashed run has the same `steps`, so its lr schedule is the same one (a shorter run would not be).
    broken = job(tmp_path, "run.name=resumed", "steps=6", "ckpt_every=3", f"init_from={init}", "run.seed=2")
    ctl_b, run_b, _ = run_train(broken)
    import shutil
    shutil.rmtree(run_b.dir / "checkpoints" / "step_00000006")
    (run_b.dir / "checkpoints" / "latest").write_text("step_00000003")
    ctl_b, run_b, _ = run_train(broken, resume=True)
    for (k, a), b in zip(ctl_a.trainer.model.state_dict().items(), ctl_b.trainer.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert rows(run_a.dir)[1:] == rows(run_b.dir)[1:]
    assert any(r["step"] > 3 and r.get("step/skipped") == 0.0 for r in rows(run_a.dir))   # resumed steps trained


def test_bad_recipes_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.name.*Did you mean 'grpo'"):
        job(tmp_path, "algorithm.name=grpoo")
    with pytest.raises(ConfigError, match="rollout.k must be >= 2"):
        job(tmp_path, "rollout.k=1")
    with pytest.raises(ConfigError, match="algorithm.clip_epz.*Did you mean 'algorithm.clip_eps'"):
        job(tmp_path, "algorithm.clip_epz=0.1")
    with pytest.raises(ConfigError, match="algorithm.clip_eps"):
        job(tmp_path, "algorithm.clip_eps=0")
    with pytest.raises(ConfigError, match="clip_eps_high"):
        job(tmp_path, "algorithm.clip_eps=0.3", "algorithm.clip_eps_high=0.2")
    with pytest.raises(ConfigError, match="env.name.*Did you mean 'arithmetic'"):
        job(tmp_path, "env.name=arithmatic")


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    ctl, run, _ = run_train(job(tmp_path, "steps=1"))
    with pytest.raises(CheckpointError, match="model.n_layer: checkpoint 2 vs config 3"):
        run_train(job(tmp_path, "run.name=other", "model.n_layer=3", f"init_from={run.dir / 'sft'}"))


def test_logp_check_stops_a_run_whose_trainer_disagrees_with_rollout(tmp_path):
    ctl, run, _ = run_train(job(tmp_path, "steps=1"))
    j = job(tmp_path, "run.name=bad", f"init_from={run.dir / 'sft'}", "steps=3")
    ctl, _ = build(j, run.dir / "sft")
    ctl.trainer.temperature = 0.9          # the classic bug: temperature on one side only
    with pytest.raises(LogpMismatchError, match="temperature"):
        for _ in range(10):     # until a step is not skipped as all-degenerate
            ctl.step()


def test_cli_train_and_algorithm_module(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", *TINY, f"run.out_dir={out}", "steps=2"]) == 0
    assert "acc/heldout_final" in capsys.readouterr().out
    assert (out / "grpo" / "report.md").exists() and (out / "grpo" / "heldout_accuracy_and_reward.png").exists()
    assert main(["train", *TINY, f"run.out_dir={out}", "steps=2"]) == 2          # exists: needs --resume
    assert main(["train", *TINY, f"run.out_dir={out}", "steps=3", "--resume", "--allow-change", "steps"]) == 0
    assert main(["train", *TINY, f"run.out_dir={out}", "algorithm.nme=x"]) == 2


def test_config_yaml_writes_the_algorithms_resolved_settings(tmp_path):
    j = job(tmp_path, "algorithm.name=dapo")
    written = yaml.safe_load(dump_config(j))["algorithm"]
    assert set(written) == set(ALGORITHMS["dapo"].Config.model_fields)            # every field, not {name: dapo}
    # DAPO's own defaults and the ones resolved from the rollout (TINY: max_tokens 24; the buffer is 20 % of it)
    assert {k: written[k] for k in ("clip_eps", "clip_eps_high", "norm_len", "overlong_max_len",
                                    "overlong_buffer")} == {"clip_eps": 0.2, "clip_eps_high": 0.28, "norm_len": 24,
                                                            "overlong_max_len": 24, "overlong_buffer": 5}
    f = tmp_path / "config.yaml"
    f.write_text(dump_config(j))
    assert load_train_job(str(f), []) == j                                        # the folder's config reloads as is


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_section_of_a_train_config_is_written_out(tmp_path, name):
    j = job(tmp_path, f"algorithm.name={name}")
    assert_all_fields(j, yaml.safe_load(dump_config(j)))


def test_every_jobs_config_writes_every_default():
    for cls in (SFTJob, TrainJob, PipelineJob, EvalJob):     # DPOJob, RMJob: tests/test_preference.py
        assert_all_fields(cls(), yaml.safe_load(dump_config(cls())))


def assert_all_fields(model, written: dict, where: str = ""):
    """Every field of `model` (of its own class: an algorithm's Config subclass included) is in `written`."""
    for name, value in model:
        assert name in written, f"{where}{name} missing from config.yaml"
        if isinstance(value, BaseModel):
            assert_all_fields(value, written[name], f"{where}{name}.")


def test_a_recipe_naming_another_algorithm_starts_from_that_algorithms_defaults(tmp_path):
    # the default (grpo) section's keys are not carried over to the algorithm a recipe or override names,
    # and keys resolved from the rollout follow the rollout given, not the default one
    j = job(tmp_path, "algorithm.name=reinforce", "rollout.max_tokens=20")
    assert type(j.algorithm) is ALGORITHMS["reinforce"].Config and j.algorithm.norm_len == 20
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  name: rloo\n  beta: 0.01\n")
    j = load_train_job(str(recipe), ["rollout.max_tokens=16"])
    assert (j.algorithm.name, j.algorithm.beta, j.algorithm.norm_len) == ("rloo", 0.01, 16)
    with pytest.raises(ConfigError, match="algorithm must be a section"):
        job(tmp_path, "algorithm=ppo")


def test_the_algorithms_own_defaults_lie_beneath_the_recipe_and_the_overrides(tmp_path):
    ppo = load_train_job(None, ["algorithm.name=ppo"])
    assert (ppo.trainer.epochs, ppo.run.name) == (4, "ppo")           # PPO's trainer_defaults; its own run folder
    assert load_train_job(None, ["algorithm.name=ppo", "trainer.epochs=2"]).trainer.epochs == 2   # the user wins
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run:\n  name: mine\nalgorithm:\n  name: ppo\ntrainer:\n  epochs: 3\n")
    j = load_train_job(str(recipe), [])
    assert (j.trainer.epochs, j.run.name) == (3, "mine")              # and so does the recipe
    assert load_train_job(str(recipe), ["algorithm.name=grpo"]).trainer.epochs == 3
    # `rlpt train algorithm.name=grpo` and the README's `rlpt train recipes/grpo_arith.yaml`: two run folders
    assert load_train_job(None, []).run.name == load_train_job(None, ["algorithm.name=grpo"]).run.name == "grpo"
    assert load_train_job("recipes/grpo_arith.yaml", []).run.name == "grpo_arith"
    assert load_train_job("recipes/grpo_arith.yaml", ["algorithm.name=ppo"]).trainer.epochs == 4   # no epochs there


def test_rlpt_alone_prints_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: rlpt" in out and all(c in out for c in ("sft", "train", "pipeline", "eval", "compare"))


def test_rlpt_eval_combines_its_chunks_as_one_evaluation(monkeypatch):
    """`rlpt eval` scores in chunks (a progress bar per chunk): the chunk means weighted by chunk size are
    the whole set's means; a key some chunk lacks is dropped; chunk i samples with seed i."""
    import rlpt.cli
    import rlpt.framework.evaluate
    calls = []

    def fake(model, env, chunk, max_tokens, k=0, seed=0):
        calls.append((len(chunk), seed))
        out = {"acc": sum(x < 300 for x in chunk) / len(chunk), "len": sum(chunk) / len(chunk)}
        return out | ({"turns": 1.0} if seed == 0 else {})
    monkeypatch.setattr(rlpt.framework.evaluate, "evaluate", fake)
    res = rlpt.cli.evaluate_in_chunks(None, None, list(range(600)), 8, progress=False)
    assert calls == [(256, 0), (256, 1), (88, 2)]
    assert res == {"acc": 0.5, "len": 299.5}     # 300 of 600 below 300; the mean of 0..599
