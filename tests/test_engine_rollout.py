"""The engine as the framework's rollout backend (`rollout.backend=engine`): same contract as the simple
sampler, the run-time log-prob check, weight sync, multi-turn, bit-identical resume."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.checkpoint import save_checkpoint
from rlpt.config import ConfigError
from rlpt.framework.agent_loop import MultiTurnRollout
from rlpt.framework.algorithm import make_algorithm
from rlpt.framework.controller import Controller
from rlpt.framework.environment import ArithmeticEnv
from rlpt.framework.evaluate import evaluate
from rlpt.framework.reference import Reference
from rlpt.framework.rollout import Rollout
from rlpt.framework.trainer import Trainer
from rlpt.framework.trajectory import collate, per_token_logp
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.train import build, load_train_job, run_train

from conftest import TINY_RL, TOK, ParityEnv, ReplyOnceEnv, tiny_gpt

# TINY_RL with this file's shorter budget and evaluation
TINY = [*TINY_RL, "rollout.max_tokens=16", "eval.size=8", "eval.every=2"]


def test_backends_agree_at_temperature_zero():
    env = ParityEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    prompts = [env.reset("train") for _ in range(12)]           # ragged lengths
    m = tiny_gpt()
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    simple = Rollout(m, TOK, 4, sp, backend="simple")
    eng = Rollout(m, TOK, 4, sp, backend="engine")
    a = simple._sample([p.ids for p in prompts], sp)
    b = eng._sample([p.ids for p in prompts], sp)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.finish_reason for s in a] == [s.finish_reason for s in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.logps), torch.tensor(y.logps), atol=1e-5)
    assert evaluate(m, env, prompts, 12, backend="simple") == evaluate(m, env, prompts, 12, backend="engine")
    with pytest.raises(ValueError, match="rollout.backend must be one of"):
        Rollout(m, TOK, 4, sp, backend="sglang")   # "vllm" is a backend now (rlpt/engine/vllm_backend.py)


def test_engine_backend_grpo_steps_pass_the_logp_check_and_see_weight_sync():
    policy = tiny_gpt()
    env = ParityEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    rollout = Rollout(copy.deepcopy(policy), TOK, 3, SamplingParams(max_tokens=8, temperature=1.0),
                            backend="engine")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    trainer = Trainer(policy, opt, None, 1.0, 0, 1, 1, temperature=1.0)
    ctl = Controller(rollout, env, Reference(policy, temperature=1.0),
                     make_algorithm({"name": "grpo"}, 4, 8), trainer, WeightSyncer(1), 4, TOK.pad_id)
    llm = None
    for _ in range(3):
        m = ctl.step()                      # raises LogpMismatchError past check.logp_tol (1e-5 mean)
        assert m["check/logp_mismatch"] < 1e-5
        llm = rollout._engine.engine(rollout.model)
        # the sync copied in place; the engine notices on its next call and runs the trainer's weights
        assert llm.runner.refresh() and not llm.runner.refresh()
        w = llm.runner.w_qkv[0]                              # fused q|k|v (q, k rows permuted; v as is)
        assert torch.equal(w[-policy.cfg.n_kv_head * policy.cfg.head_dim:], policy.layers[0].attn.v_proj.weight)
    trajs = [t for g in rollout.generate(env, 4) for t in g]
    b = collate(trajs, TOK.pad_id)
    with torch.no_grad():
        lp = per_token_logp(rollout.model, b.input_ids)
    assert ((lp - b.old_logp).abs() * b.mask).max() < 1e-5
    assert llm.bm.num_available == llm.bm.num_blocks      # no KV block leaked across steps


def test_engine_backend_multi_turn_matches_simple_at_temperature_zero_and_passes_logp_check():
    env = ReplyOnceEnv(ArithmeticTask(max_operands=3), tokenizer=TOK)
    prompts = env.heldout(6)
    got = {}
    for backend in ("simple", "engine"):
        got[backend] = evaluate(tiny_gpt(), env, prompts, 20, backend=backend, max_turns=2, turn_tokens=6)
    assert got["simple"] == got["engine"]
    policy = tiny_gpt()
    rollout = MultiTurnRollout(copy.deepcopy(policy), TOK, 3, SamplingParams(max_tokens=20, temperature=1.0),
                                     seed=0, max_turns=2, turn_tokens=6)
    rollout.use_backend("engine")
    trajs = [t for g in rollout.generate(env, 4) for t in g]
    assert any(t.info["tool_tokens"] == 4 for t in trajs)           # a tool reply sits inside some responses
    b = collate(trajs, TOK.pad_id)
    with torch.no_grad():
        lp = per_token_logp(rollout.model, b.input_ids)
    assert ((lp - b.old_logp).abs() * b.mask).max() < 1e-5


@pytest.mark.parametrize("backend", ["engine", "simple"])
def test_resume_is_bit_identical(tmp_path, backend):
    # an SFT start (as tests/test_train.py) so that groups are mixed and the resumed steps really train
    common = [*TINY, f"run.out_dir={tmp_path / 'runs'}", f"rollout.backend={backend}", "steps=3", "ckpt_every=1",
              "sync.every=3", "rollout.prompts_per_step=8", "rollout.max_tokens=24", "task.max_operands=2",
              "task.max_value=4"]
    ctl_a, run_a, _ = run_train(load_train_job(None, [*common, "run.name=straight"]))
    crashed = load_train_job(None, [*common, "run.name=resumed", f"init_from={run_a.dir / 'sft'}"])
    run_train(crashed)                                                  # a crash after step 2: resume from it
    ckpts = run_a.dir.parent / "resumed" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000003")
    (ckpts / "latest").write_text("step_00000002")
    ctl_b, run_b, _ = run_train(crashed, resume=True)
    for (k, a), b in zip(ctl_a.trainer.model.state_dict().items(), ctl_b.trainer.model.state_dict().values()):
        assert torch.equal(a, b), k
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "mem/"))}
                      for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(run_a.dir)[1:] == rows(run_b.dir)[1:]
    # step 3 trained, on the rollout weights of steps 1-2 (sync.every=3): the engine's state carried over
    # from step 2 in the straight run and was fresh in the resumed one
    assert any(r["step"] == 3 and r.get("step/skipped") == 0.0 for r in rows(run_a.dir))


def test_rollout_backend_config_key():
    job = load_train_job(None, ["rollout.backend=engine"])
    assert job.rollout.backend == "engine" and load_train_job(None, []).rollout.backend == "engine"
    assert load_train_job(None, ["rollout.backend=simple"]).rollout.backend == "simple"
    assert load_train_job(None, ["rollout.backend=vllm"]).rollout.backend == "vllm"   # rlpt/engine/vllm_backend.py
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_train_job(None, ["rollout.backend=sglang"])


def test_the_engine_is_the_default_and_names_the_fix_for_models_it_cannot_serve():
    from rlpt.framework.rollout import backend_for
    sp = SamplingParams(max_tokens=4, temperature=1.0)
    assert Rollout(tiny_gpt(), TOK, 4, sp).backend == "engine"

    class NotGPT(torch.nn.Module):           # e.g. an HF policy: the simple sampler drives it, the engine cannot
        pass
    other = Rollout(NotGPT(), TOK, 1, sp)
    with pytest.raises(ValueError, match="serves gpt_mini GPT models.*got NotGPT.*rollout.backend=simple"):
        other.generate(ArithmeticEnv(ArithmeticTask(max_operands=2), tokenizer=TOK), 2)
    assert backend_for(tiny_gpt()) == "engine" and backend_for(NotGPT()) == "simple"


def test_build_wires_the_backend(tmp_path):
    init = tmp_path / "init"
    model = tiny_gpt()
    save_checkpoint(init, model, model.cfg.to_dict(), {"step": 0})
    ctl, _ = build(load_train_job(None, [*TINY, "rollout.backend=engine", f"init_from={init}"]), init)
    assert ctl.rollout.backend == "engine"
    ctl.step()
