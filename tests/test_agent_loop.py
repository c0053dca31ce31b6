"""Multi-turn rollout and the calculator tool (lesson 08): the mask, the budgets, the tool parser."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.envs.calculator import CalculatorArithmeticEnv, ToolError, tool_reply
from rlpt.envs.calculator import evaluate as calculate
from rlpt.framework.agent_loop import MultiTurnRollout
from rlpt.framework.algorithm import make_algorithm
from rlpt.framework.controller import Controller
from rlpt.framework.environment import Prompt
from rlpt.framework.evaluate import evaluate
from rlpt.framework.reference import Reference
from rlpt.framework.trainer import Trainer
from rlpt.framework.trajectory import collate, per_token_logp
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.task import ArithmeticTask

from conftest import TOK, ReplyOnceEnv, tiny_gpt

LESSON = "let me compute c(123+456+789)#" "=1368#" "the answer is 1368#"


class ScriptedModel(torch.nn.Module):
    """gpt_mini's incremental interface; the next token is `script(response text so far)`, logit +15 (others 0)."""

    def __init__(self, script, max_seq_len=96):
        super().__init__()
        self.script = script
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def new_cache(self, B, L):
        return {"hist": [[] for _ in range(B)]}

    def forward(self, ids, cache=None, positions=None, key_mask=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, TOK.vocab_size)
        for b in range(B):
            keep = ids[b][key_mask[b]] if key_mask is not None else ids[b]
            cache["hist"][b] += keep.tolist()
            logits[b, -1, TOK.stoi[self.script(self.seen(TOK.decode(cache["hist"][b])))]] = 15.0
        return logits

    def seen(self, context: str) -> str:
        """What the script is shown: the response so far (the text after the prompt's `>`)."""
        return context.split(">", 1)[1]


class PromptScriptedModel(ScriptedModel):
    """Like ScriptedModel, but the script sees the whole context, prompt included."""

    def seen(self, context: str) -> str:
        return context


def lesson_script(r):
    return LESSON[len(r)] if LESSON.startswith(r) and len(r) < len(LESSON) else "#"


def always_call(r):          # calls the tool every turn, never answers
    partial = r.split("#")[-1]
    return "c(1+1)#"[len(partial)] if len(partial) < 7 else "#"


class FixedCalculator(CalculatorArithmeticEnv):
    def reset(self, split="train"):
        return Prompt("<123+456+789>", TOK.encode("<123+456+789>"), 1368)


def engine(script, **kw):
    sp = SamplingParams(max_tokens=kw.pop("max_tokens", 64), temperature=1.0)
    return MultiTurnRollout(ScriptedModel(script), TOK, 1, sp, backend="simple", **kw)   # a double: not the engine's


# -- the lesson-08 trajectory ------------------------------------------------------------------------
def lesson_trajectory():
    t = engine(lesson_script, max_turns=4).generate(FixedCalculator(tokenizer=TOK), 1)[0][0]
    return t


def test_lesson08_example_mask():
    t = lesson_trajectory()
    assert len(t.prompt_ids) == 13 and len(t.response_ids) == 55
    assert t.info["text"] == LESSON
    assert t.response_mask.tolist() == [1.0] * 30 + [0.0] * 6 + [1.0] * 19     # 49 of 55 scored
    assert t.old_logp[30:36].tolist() == [0.0] * 6
    assert (t.old_logp[t.response_mask == 1] < 0).all()          # real sampling log-probs elsewhere
    assert t.reward == 1.0 and t.info["turns"] == 2 and t.info["tool_calls"] == 1
    assert t.finish_reason == "stop" and t.info["tool_tokens"] == 6
    b = collate([t], TOK.pad_id)
    assert b.agg_tokens == 49.0
    assert b.mask[0, 12:12 + 55].tolist() == t.response_mask.tolist()   # response token i at column P+i-1


def test_tool_positions_do_not_change_the_loss_or_get_gradient():
    t = lesson_trajectory()
    g = torch.Generator().manual_seed(0)
    t.ref_logp = (t.old_logp - 0.1 * torch.rand(55, generator=g)) * t.response_mask
    t.advantage = 0.8
    b = collate([t], TOK.pad_id)
    algo = make_algorithm({"name": "grpo", "beta": 0.05, "loss_agg": "token-mean"}, group_size=2, max_tokens=64)
    new = (b.old_logp + 0.05 * torch.randn(b.old_logp.shape, generator=g)) * b.mask
    junk = torch.randn(b.old_logp.shape, generator=g) * 5 * (1 - b.mask)    # only where the mask is 0: tools
    assert junk[0, 12 + 30:12 + 36].abs().sum() > 0
    loss, _ = algo.compute_loss(b, new)
    x = (new + junk).requires_grad_(True)
    loss2, _ = algo.compute_loss(b, x)
    assert float(loss2.detach()) == float(loss)
    loss2.backward()
    assert x.grad[0, 12 + 30:12 + 36].abs().sum() == 0 and x.grad[b.mask == 1].abs().sum() > 0


# -- the tool --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,reply", [
    ("let me compute c(123+456+789)#", "=1368#"),
    ("c(2*(3+4))#", "=14#"), ("c(1 + 2)#", "=3#"), ("c(-5+2)#", "=-3#"), ("c(7/2)#", "=3#"),
    ("c(1)c(2)#", "=1#"),                                       # the first call only
    ("c(1/0)#", "=error division by zero#"), ("c(1/(2-2))#", "=error division by zero#"),
    ("c(1+)#", "=error malformed#"), ("c(12+34#", "=error malformed#"), ("c(1.5)#", "=error malformed#"),
    ("c()#", "=error empty#"), ("c(c(1))#", "=error nested call#"), ("c((((((1))))))#", "=error too deep#"),
    ("c(1234567890123+1)#", "=error number too long#"),
    ("c(999999999999*999999999999*999999999999)#", "=error result too big#"),
    ("c(" + "1+" * 60 + "1)#", "=error expression too long#"),
    ("the answer is 12#", None), ("12#", None),
])
def test_tool_call_parsing(text, reply):
    assert tool_reply(text) == reply
    if reply is not None:
        TOK.encode(reply)            # every reply, errors included, is in the alphabet


def test_evaluate_never_uses_eval():
    with pytest.raises(ToolError):
        calculate("__import__('os')")
    assert calculate("((1+2)*(3+4))-5") == 16


def test_calculator_env_step():
    env = CalculatorArithmeticEnv(tokenizer=TOK)
    st = env.start(Prompt("<3+4>", [], 7))
    assert env.step("c(3+4)#", st)[:3] == ("=7#", 0.0, False)
    assert env.step("the answer is 7#", st)[1:3] == (1.0, True)
    assert env.step("42#", st)[1:3] == (0.0, True)


# -- budgets -------------------------------------------------------------------------------------------------
def test_max_turns_gives_reward_zero_and_valid_masks():
    t = engine(always_call, max_turns=3).generate(FixedCalculator(tokenizer=TOK), 2)[0][0]
    assert t.info["turns"] == 3 and t.finish_reason == "max_turns" and t.reward == 0.0
    assert t.info["text"] == "c(1+1)#=2#" * 2 + "c(1+1)#=2#"
    assert t.response_mask.tolist() == ([1.0] * 7 + [0.0] * 3) * 3
    assert t.old_logp[t.response_mask == 0].abs().sum() == 0


def test_turn_budget_and_total_budget():
    t = engine(lambda r: "a", max_turns=3, turn_tokens=5).generate(FixedCalculator(tokenizer=TOK), 1)[0][0]
    assert (t.info["text"], t.finish_reason, t.info["turns"], t.reward) == ("aaaaa", "length", 1, 0.0)
    assert t.response_mask.tolist() == [1.0] * 5
    t = engine(always_call, max_turns=10, max_tokens=25).generate(FixedCalculator(tokenizer=TOK), 1)[0][0]
    assert t.finish_reason == "length" and t.reward == 0.0
    assert len(t.response_ids) <= 25 and t.info["turns"] == 3    # 10 + 10 + 5 sampled
    assert t.response_mask.sum() == 7 + 7 + 5 and len(t.response_mask) == len(t.old_logp) == len(t.response_ids)


# -- a real model: old_logp equals the trainer's log-probs through tool tokens, controller unchanged --------------
def ending_its_turns(model, lean=0.5):
    """A random tiny GPT tilted toward `#`, so that its turns end and ReplyOnceEnv's groups are mixed (untilted,
    nearly every turn runs out of tokens: reward 0 everywhere, every step skipped). Every embedding row (tied:
    every output row too) gets +1 on dim 0, which then dominates the final norm's output: the common logit
    shift cancels and `#`'s extra `lean` puts its logit about lean·√d_model above the rest."""
    with torch.no_grad():
        model.embed.weight[:, 0] += 1.0
        model.embed.weight[TOK.eos_id, 0] += lean
    return model


def test_real_model_multiturn_step_with_logp_check():
    policy = ending_its_turns(tiny_gpt())
    sp = SamplingParams(max_tokens=20, temperature=1.0)
    rollout = MultiTurnRollout(copy.deepcopy(policy), TOK, 3, sp, seed=0, max_turns=2, turn_tokens=6)
    env = ReplyOnceEnv(ArithmeticTask(max_operands=3), tokenizer=TOK)
    groups = rollout.generate(env, 4)
    trajs = [t for g in groups for t in g]
    assert any(t.info["tool_tokens"] == 4 for t in trajs)
    for t in trajs:
        assert t.info["turns"] <= 2 and t.response_mask.sum() <= 12
    b = collate(trajs, TOK.pad_id)
    with torch.no_grad():
        lp = per_token_logp(rollout.model, b.input_ids)
    assert ((lp - b.old_logp).abs() * b.mask).max() < 1e-5
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    trainer = Trainer(policy, opt, None, 1.0, 0, 1, 1, temperature=1.0)
    algo = make_algorithm({"name": "grpo"}, 4, 20)
    ctl = Controller(rollout, env, Reference(policy), algo, trainer, WeightSyncer(1), 4, TOK.pad_id)
    ms = [ctl.step() for _ in range(3)]     # raises LogpMismatchError if tool tokens leaked into the ratio check
    trained = [m for m in ms if not m["step/skipped"]]
    assert len(trained) >= 2 and all(m["sync/done"] == 1.0 and m["check/logp_mismatch"] < 1e-5 for m in trained)
    # one turn: the env's reply comes, its verdict never does (the second turn scores)
    ev = evaluate(rollout.model, env, env.heldout(4), 20, max_turns=1, turn_tokens=6)
    assert (ev["acc"], ev["turns"]) == (0.0, 1.0)


def test_evaluate_runs_every_turn_and_scores_the_last():
    """`ab#`, the env's `=12#`, then `c#` (even length: reward 1) on prompts whose first operand is even and
    `cd#` (odd: 0) on the others: acc is the even share, every episode takes two turns."""
    def script(text):
        prompt, r = text.split(">", 1)
        want = "ab#=12#" + ("c#" if int(prompt[1:].split("+")[0]) % 2 == 0 else "cd#")
        return want[len(r)] if len(r) < len(want) else "#"

    env = ReplyOnceEnv(ArithmeticTask(max_operands=3), tokenizer=TOK)
    prompts = env.heldout(8)
    even = [int(p.text[1:].split("+")[0]) % 2 == 0 for p in prompts]
    assert 0 < sum(even) < 8                                            # both kinds of prompt
    ev = evaluate(PromptScriptedModel(script), env, prompts, 20, max_turns=2, turn_tokens=6)
    assert (ev["acc"], ev["turns"]) == (sum(even) / 8, 2.0)
    assert ev["len"] == sum(3 + 4 + (2 if e else 3) for e in even) / 8  # tool tokens count in the length
    one = evaluate(PromptScriptedModel(script), env, prompts, 20, max_turns=1, turn_tokens=6)
    assert (one["acc"], one["turns"], one["len"]) == (0.0, 1.0, 7.0)    # `ab#=12#`, then out of turns


def test_train_job_accepts_calculator_and_picks_agent_loop():
    from rlpt.train import load_train_job
    job = load_train_job(None, ["env.name=calculator", "rollout.max_turns=3"])
    assert job.env.name == "calculator" and job.rollout.max_turns == 3
    from rlpt.framework.environment import make_env
    assert getattr(make_env("calculator", tokenizer=TOK), "multi_turn", False)


def test_tool_use_sft_trace_matches_the_rollout_mask():
    from rlpt.envs.calculator import tool_use_trace
    text, mask = tool_use_trace((123, 456, 789))
    t = lesson_trajectory()
    assert text == LESSON and mask == t.response_mask.tolist()


def test_rlpt_train_runs_the_calculator_env(tiny_train_job):
    from rlpt.train import run_train
    ctl, run, final = run_train(tiny_train_job("steps=2", "env.name=calculator", "sft.format=tool",
                                               "rollout.max_turns=2", "rollout.turn_tokens=12", "eval.every=2"))
    assert isinstance(ctl.rollout, MultiTurnRollout) and ctl.rollout.max_turns == 2
    assert "acc/heldout_final" in final


# -- SFT on tool traces (sft.format=tool) and its held-out evaluation through the agent loop ----------------
def tool_user(text):
    """Calls the tool on the prompt's sum (`c(3+4)#`), then answers with the number it replied (`7#`)."""
    prompt, r = text.split(">", 1)
    call = f"c({prompt[1:]})#"
    if len(r) < len(call):
        return call[len(r)]
    if "#" not in r[len(call):]:
        return "#"            # a row that already stopped, still decoded alongside the others
    reply, partial = r[len(call):].split("#", 1)          # `=7`, the answer so far
    answer = reply[1:] + "#"
    return answer[len(partial)] if len(partial) < len(answer) else "#"


def test_tool_format_batch_masks_exactly_the_tool_reply():
    import rlpt.envs  # noqa: F401 - registers sft.format=tool
    from rlpt.gpt_mini.task import Problem
    from rlpt.sft import sft_batch
    ids, mask = sft_batch([Problem((123, 456, 789)), Problem((3, 4))], "tool", TOK)
    assert TOK.decode(ids[0]) == "<123+456+789>c(123+456+789)#=1368#1368#" and ids.shape == (2, 13 + 26)
    # row 0: prompt 13 tokens; the response is 15 assistant (`c(123+456+789)#`) + 6 tool (`=1368#`) + 5 assistant
    # (`1368#`); the target at column j is token j+1, so the response starts at column 12, the tool reply at 27
    assert mask[0].tolist() == [0.0] * 12 + [1.0] * 15 + [0.0] * 6 + [1.0] * 5
    targets = ids[0, 1:]
    assert TOK.decode(targets[12:12 + 26][mask[0, 12:12 + 26] == 0]) == "=1368#"
    # row 1: `<3+4>` (5) + `c(3+4)#` (7) + `=7#` (3, masked) + `7#` (2), then padding
    assert TOK.decode(ids[1, :17]) == "<3+4>c(3+4)#=7#7#"
    assert mask[1].tolist() == [0.0] * 4 + [1.0] * 7 + [0.0] * 3 + [1.0] * 2 + [0.0] * (38 - 16)
    assert mask.sum().item() == 20 + 9


def test_tool_format_loss_ignores_logits_at_masked_positions():
    import rlpt.envs  # noqa: F401
    from rlpt.gpt_mini.task import Problem
    from rlpt.sft import sft_batch, sft_loss
    ids, mask = sft_batch([Problem((123, 456, 789)), Problem((3, 4))], "tool", TOK)
    model = tiny_gpt(n_layer=1, n_kv_head=2, d_model=16, d_ff=32)
    g = torch.Generator().manual_seed(0)

    class Perturbed(torch.nn.Module):       # adds large noise to the logits where `where` is 1
        def __init__(self, where):
            super().__init__()
            self.where = where

        def forward(self, x):
            logits = model(x)
            noise = 20 * torch.randn(logits.shape, generator=g)
            w = torch.cat([self.where, torch.zeros(len(x), 1)], 1)[..., None]   # (B, T, 1): columns 0..T-2
            return logits + noise * w

    tool_only = torch.zeros_like(mask)
    tool_only[0, 27:33] = 1                      # the targets `=1368#`
    tool_only[1, 11:14] = 1                      # the targets `=7#`
    with torch.no_grad():
        base = sft_loss(model, ids, mask)
        assert float(sft_loss(Perturbed(1 - mask), ids, mask)) == float(base)   # tool reply, prompt, padding
        assert float(sft_loss(Perturbed(tool_only), ids, mask)) == float(base)
        assert abs(float(sft_loss(Perturbed(mask), ids, mask)) - float(base)) > 1e-3   # a scored position moves it


def test_tool_format_heldout_eval_runs_the_calculator():
    from rlpt.gpt_mini.task import Problem
    from rlpt.sft import sft_env
    problems = [Problem((123, 456, 789)), Problem((3, 4)), Problem((905, 17))]
    model = PromptScriptedModel(tool_user, max_seq_len=96)
    tool_env = sft_env("tool", ArithmeticTask(), TOK)
    ev = evaluate(model, tool_env, [tool_env._prompt(p) for p in problems], 64, k=2)
    assert ev["acc"] == 1.0 and ev["pass@2"] == 1.0 and ev["tool_calls"] == 1.0 and ev["tool_errors"] == 0.0
    assert ev["turns"] == 2.0 and ev["acc_sampled"] == 1.0
    # without the tool the same model's one decode is `c(3+4)#`: its last integer is an operand, never the sum
    plain = sft_env("direct", ArithmeticTask(), TOK)
    assert evaluate(model, plain, [plain._prompt(p) for p in problems], 64)["acc"] == 0.0


def test_unknown_trace_format_names_the_key():
    from rlpt.config import ConfigError
    from rlpt.gpt_mini.task import trace_format
    with pytest.raises(ConfigError, match="sft.format='nope'"):
        trace_format("nope")


# -- an honest held-out metric next to a hackable reward (env `leaky`) ------------------------------------------
def test_leaky_heldout_eval_reports_honest_accuracy():
    from rlpt.envs.leaky import LeakyArithmeticEnv
    env = LeakyArithmeticEnv(ArithmeticTask(max_operands=2), tokenizer=TOK)
    prompts = env.heldout(6)

    def soup(text):           # writes the gold, then one more number: leaky reward 1, honest 0
        prompt, r = text.split(">", 1)
        want = f"{sum(map(int, prompt[1:].split('+')))} 0#"
        return want[len(r)] if len(r) < len(want) else "#"

    ev = evaluate(PromptScriptedModel(soup), env, prompts, 8)
    assert ev["acc"] == 1.0 and ev["acc_honest"] == 0.0


def test_rlpt_train_logs_honest_heldout_accuracy_for_leaky(tiny_train_job):
    import json

    from rlpt.train import run_train
    _, run, final = run_train(tiny_train_job("steps=1", "env.name=leaky", "eval.every=1"))
    rows = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "acc/heldout" in r]
    assert evals and all("acc/heldout_honest" in r and r["acc/heldout_honest"] <= r["acc/heldout"] for r in evals)
    assert "acc/heldout_honest_final" in final


def test_sft_tool_format_end_to_end_and_rlpt_eval_runs_the_tool(tiny_job, capsys):
    import rlpt.envs  # noqa: F401
    from rlpt.cli import main
    from rlpt.config import ConfigError
    from rlpt.gpt_mini.task import make_task
    from rlpt.sft import sft_env, train_sft
    with pytest.raises(ConfigError, match="eval.max_tokens=8"):     # TINY's 8 cannot hold `c(9+9+9+9)#=36#36#`
        train_sft(tiny_job("sft.format=tool", "sft.steps=4", "run.name=short"))
    assert not (Path(tiny_job().run.out_dir) / "short" / "metrics.jsonl").exists()     # before any step
    job = tiny_job("sft.format=tool", "sft.steps=4", "eval.max_tokens=20", "run.name=t")
    model, run, final = train_sft(job)
    env = sft_env("tool", make_task(job.task), TOK)       # the job's numbers are the evaluator's, through the tool
    ev = evaluate(model, env, env.heldout(job.eval.size), 20, k=2, seed=job.run.seed)
    assert (final["tool/calls_heldout"], final["tool/errors_heldout"], final["pass@2/heldout"], final["acc/heldout"]) \
        == (ev["tool_calls"], ev["tool_errors"], ev["pass@2"], ev["acc"])
    rows = run.read_metrics()
    assert all("tool/calls_heldout" in r for r in rows if "acc/heldout" in r)
    capsys.readouterr()
    assert main(["eval", str(run.dir), "eval.size=4", "eval.max_tokens=20"]) == 0
    out = capsys.readouterr().out
    assert "tool_calls/heldout" in out and "| format" in out and "tool |" in out      # read from the run's config
    assert main(["eval", str(run.dir), "eval.size=4", "--format", "direct"]) == 0
    assert "tool_calls" not in capsys.readouterr().out


def test_tool_sft_start_needs_a_tool_env():
    from rlpt.config import ConfigError
    from rlpt.train import load_train_job
    with pytest.raises(ConfigError, match="sft.format=tool .* env.name='arithmetic'"):
        load_train_job(None, ["sft.format=tool"])
    assert load_train_job(None, ["sft.format=tool", "env.name=calculator"]).sft.format == "tool"
    job = load_train_job(str(Path(__file__).parents[1] / "recipes" / "tool_arith.yaml"),
                         ["sft.format=direct", "env.name=arithmetic"])                      # demo arm (b)
    assert job.task.max_value == 999 and job.steps == 80
