"""Lesson 17: steps, Monte-Carlo process labels, the PRM/ORM head, and the search strategies.

The exact tests run against `FakeLLM`, a deterministic policy behind `LLM.generate`'s API that writes the
chain of thought of the prompt's problem from whatever prefix it is given (erring where told), so every
label, choice and token count is known by hand. The engine itself is checked where it matters: the prefix
fork counter of the MC labeller and a step-wise beam against greedy decoding.
"""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from rlpt.engine import LLM
from rlpt.engine.sequence import CompletionOutput, RequestOutput
from rlpt.gpt_mini.task import Problem, parse_prompt
from rlpt.search.jobs import ScorerJob, draw_rows, prompt_groups, scorer_rows
from rlpt.search.labels import StepRow, auroc, label_auroc, load_rows, mc_labels, save_rows, within_auroc
from rlpt.search.scorer import LogProbScorer, OracleScorer, StepScorer, bce_at, boundary_targets, last_read, rank_loss
from rlpt.search.steps import outcome, split_steps, step_ends, true_step_labels
from rlpt.search.strategies import (
    STRATEGIES,
    Samples,
    aggregate,
    beam_search,
    best_of_n,
    dvts,
    greedy,
    pick_best,
    pick_majority,
    pick_weighted,
    run_strategy,
    sample,
    score_samples,
)

from conftest import TOK, tiny_gpt

SEP, END = TOK.stoi[","], TOK.eos_id


class FakeLLM:
    """Continues `<ops>` + prefix with correct steps from the prefix's last result, except: step `err_at`
    (0-based, when the prefix has not reached it) adds 1 to its sum, and at temperature > 0 each new
    step errs with probability `p_err` (seeded by the request seed and sample index). Honours n, max_tokens,
    stop_token_ids and the EOS; counts every token it generates."""

    def __init__(self, err_at: int | None = None, p_err: float = 0.0, max_seq_len: int = 64):
        self.tokenizer, self.max_seq_len = TOK, max_seq_len
        self.err_at, self.p_err, self.generated = err_at, p_err, 0

    def _continue(self, prompt: str, rng: random.Random | None) -> str:
        head, prefix = prompt[:prompt.index(">") + 1], prompt[prompt.index(">") + 1:]
        ops, done = parse_prompt(head).operands, split_steps(prefix)
        acc = int(done[-1][:-1].split("=")[1]) if done else ops[0]
        out = []
        for j in range(len(done), len(ops) - 1):
            c = acc + ops[j + 1]
            if j == self.err_at or (rng is not None and rng.random() < self.p_err):
                c += 1
            out.append(f"{acc}+{ops[j + 1]}={c}")
            acc = c
        return ",".join(out) + "#"

    def generate(self, prompts, sps):
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sps)):
            comps = []
            for j in range(sp.n):
                rng = random.Random((sp.seed or 0) * 7919 + j) if sp.temperature > 0 else None
                ids = TOK.encode(self._continue(p, rng))
                for k, t in enumerate(ids):
                    if t in sp.stop_token_ids:
                        ids = ids[:k + 1]
                        break
                ids = ids[:sp.max_tokens]
                self.generated += len(ids)
                comps.append(CompletionOutput(j, TOK.decode(ids), ids, [0.0] * len(ids), 0.0,
                                              "stop" if ids[-1] in (END, *sp.stop_token_ids) else "length"))
            outs.append(RequestOutput(i, p, TOK.encode(p), comps))
        return outs


P3 = Problem((3, 4, 5))
P4 = Problem((3, 4, 5, 6))


# -- steps ------------------------------------------------------------------------------------------------
def test_split_steps_and_boundaries_round_trip():
    text = "3+4=7,7+5=12#"
    steps = split_steps(text)
    assert steps == ["3+4=7,", "7+5=12#"] and "".join(steps) == text
    assert step_ends(TOK.encode(text), SEP, END) == [5, 12]
    assert [text[i] for i in step_ends(TOK.encode(text), SEP, END)] == [",", "#"]
    assert split_steps("3+4=7,7+") == ["3+4=7,", "7+"]                  # a tail cut by the token limit
    assert split_steps("12#junk") == ["12#"] and step_ends(TOK.encode("1,2#3,"), SEP, END) == [1, 3]


def test_true_step_labels_hand_cases():
    assert true_step_labels(P3, "3+4=7,7+5=12#") == [True, True]
    assert true_step_labels(P3, "3+4=7,7+5=13#") == [True, False]
    assert true_step_labels(P3, "3+4=8,8+5=13#") == [False, False]        # locally right, doomed prefix
    assert true_step_labels(P3, "3+4=8,8+4=12#") == [False, False]        # right answer by two errors
    assert true_step_labels(P3, "3+4=7#") == [False]                      # stopped an addition early
    assert true_step_labels(P3, "3+4=7,7+5=12,12+0=12#") == [True, False, False]   # `,` after the last addition
    assert true_step_labels(P3, "3+5=8,8+4=12#") == [False, False]        # wrong operand
    assert true_step_labels(Problem((5,)), "5#") == [True]


# -- Monte-Carlo labels --------------------------------------------------------------------------------------
def test_mc_labels_always_right_and_errs_at_step_two(tmp_path):
    right, errs = FakeLLM(), FakeLLM(err_at=1)
    good = P4.cot()                                                        # 3+4=7,7+5=12,12+6=18#
    bad = greedy(errs, [P4.prompt])[0].text
    assert bad == "3+4=7,7+5=13,13+6=19#"
    rows = mc_labels(right, [P4, P4], [good, bad], n=8)
    assert rows[0].soft_labels == [1.0, 1.0, 1.0] and rows[0].labels == [True] * 3
    assert rows[1].soft_labels == [1.0, 0.0, 0.0] and rows[1].truth == [True, False, False]
    # the labels belong to the completer: one that errs at step 2 calls the good first step hopeless
    assert mc_labels(errs, [P4], [good], n=8)[0].soft_labels == [0.0, 1.0, 1.0]
    save_rows(tmp_path / "s.jsonl", rows)
    assert load_rows(tmp_path / "s.jsonl") == rows
    assert label_auroc(rows) == 1.0


def test_mc_labels_prefill_each_prefix_once_through_the_engine():
    llm = LLM(tiny_gpt(), TOK)
    rows = mc_labels(llm, [P4], [P4.cot()], n=4, max_tokens=4)
    prefixes = [P4.prompt + "3+4=7,", P4.prompt + "3+4=7,7+5=12,"]
    assert len(rows[0].soft_labels) == 3
    assert llm.metrics()["tokens/shared_by_fork"] == sum(3 * len(p) for p in prefixes)   # n-1 forks share each


def test_auroc_hand_values():
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.2, 0.9, 0.4, 0.6], [True, False, False, True]) == 0.25    # 1 of 4 pairs ordered


# -- the scorer ---------------------------------------------------------------------------------------------
def test_prm_head_reads_exactly_the_step_boundaries():
    scorer = StepScorer(tiny_gpt(), TOK, "prm")
    rows = [(P3.prompt, "3+4=7,7+5=12#", [1.0, 0.75]), (P4.prompt, "3+4=8,8+5=13,13+6=19#", [0.0, 0.0, 0.0])]
    prompts, responses = [TOK.encode(p) for p, _, _ in rows], [TOK.encode(r) for _, r, _ in rows]
    ids, target, mask = boundary_targets(scorer, prompts, responses, [y for *_, y in rows], [1.0, 0.0])
    assert [TOK.decode(ids[b][mask[b] > 0].tolist()) for b in range(2)] == [",#", ",,#"]
    assert target[mask > 0].tolist() == [1.0, 0.75, 0.0, 0.0, 0.0]
    logits = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))
    base = bce_at(logits, target, mask)
    noisy = logits + 5 * torch.randn(ids.shape) * (1 - mask)            # change every logit off the boundaries
    assert torch.equal(bce_at(noisy, target, mask), base)
    logits.requires_grad_(True)
    bce_at(logits, target, mask).backward()
    assert torch.equal(logits.grad != 0, mask > 0)
    orm = StepScorer(tiny_gpt(), TOK, "orm")
    _, t_orm, m_orm = boundary_targets(orm, prompts, responses, [y for *_, y in rows], [1.0, 0.0])
    assert m_orm.sum() == 2 and t_orm[m_orm > 0].tolist() == [1.0, 0.0]
    assert m_orm[0, len(prompts[0]) + len(responses[0]) - 1] == 1
    assert [len(s) for s in scorer.score([(P3.prompt, "3+4=7,"), (P3.prompt, "3+4=7,7+5=12#")])] == [1, 2]


def test_rank_loss_is_its_formula_and_compares_only_responses_of_one_prompt():
    # prompt 0: one right (z=2.0), two wrong (0.5, -1.0); prompt 1: right 3.0, wrong 1.0; prompt 2: two right
    z = torch.tensor([2.0, 0.5, -1.0, 3.0, 1.0, 4.0, 4.5], requires_grad=True)
    correct = torch.tensor([True, False, False, True, False, True, True])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    # pairs (right, wrong, same prompt): (0,1) d=1.5, (0,2) d=3.0, (3,4) d=2.0; −log σ(d) = log(1 + e^−d)
    want = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-2.0))) / 3
    loss = rank_loss(z, correct, group)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert z.grad[5:].tolist() == [0.0, 0.0]                  # a prompt with no wrong response: no pair, no push
    assert z.grad[0] < 0 < z.grad[1] and z.grad[3] < 0 < z.grad[4]     # (descent raises the right, lowers the wrong)
    # across prompts nothing is compared: shift one prompt's scores far above another's, the loss stays
    shifted = z.detach() + torch.tensor([0.0, 0.0, 0.0, 50.0, 50.0, -50.0, -50.0])
    assert rank_loss(shifted, correct, group).item() == pytest.approx(want, rel=1e-6)
    # the same scores as one prompt would add the cross pairs (0,4), (3,1), (3,2), ...: a different loss
    assert rank_loss(z.detach(), correct, torch.zeros(7, dtype=torch.long)).item() != pytest.approx(want, rel=1e-3)
    none = torch.tensor([1.0, 2.0], requires_grad=True)       # no (right, wrong) pair in a prompt: 0, with a graph
    out = rank_loss(none, torch.tensor([True, False]), torch.tensor([0, 1]))
    out.backward()
    assert out.item() == 0.0 and none.grad.tolist() == [0.0, 0.0]


def test_rank_loss_reads_each_rows_final_score_and_batches_hold_whole_prompts():
    mask = torch.tensor([[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.float)
    last, has = last_read(mask)
    assert last[:2].tolist() == [3, 5] and has.tolist() == [True, True, False]
    rows = [StepRow(p, ["1#"], [True], [1.0], [True]) for p in ("<1+2>", "<3+4>", "<1+2>", "<5+6>", "<3+4>", "<1+2>")]
    groups = prompt_groups(rows)
    assert groups == [[0, 2, 5], [1, 4], [3]]
    for seed in range(5):
        drawn = draw_rows(len(rows), groups, 4, True, random.Random(seed))    # 4 rows' worth of 2-row prompts: 2
        picked = {rows[i].prompt for i in drawn}
        assert len(picked) == 2 and sorted(drawn) == sorted(i for g in groups if rows[g[0]].prompt in picked for i in g)
    assert draw_rows(6, groups, 4, False, random.Random(0)) == random.Random(0).sample(range(6), 4)   # BCE: as before


def test_within_prompt_auroc_by_hand():
    scores = [[0.9, 0.1, 0.5], [0.2, 0.8], [0.95, 0.99]]
    truth = [[True, False, False], [True, False], [True, True]]           # the last prompt has one class: skipped
    assert within_auroc(scores, truth) == pytest.approx((1.0 + 0.0) / 2)
    assert auroc(sum(scores, []), sum(truth, [])) == pytest.approx(10 / 12)  # pooled: 3 + 1 + 3 + 3 of 12
    assert math.isnan(within_auroc([[0.1]], [[True]]))


def test_a_score_does_not_depend_on_the_other_candidates_in_its_batch():
    # best-of-N scores candidates of mixed lengths in one right-padded batch: the causal trunk must read each
    # at its own delimiters, whatever is padded after it (a left-padded or bidirectional batch would not)
    torch.manual_seed(0)
    scorer = StepScorer(tiny_gpt(), TOK, "prm")
    torch.nn.init.normal_(scorer.head.weight)
    short, long = (P3.prompt, "3+4=7,7+5=12#"), (P4.prompt, "3+4=7,7+5=12,12+6=18#")
    alone = scorer.score([short])[0]
    for batch in ([short, long], [long, short, long]):
        together = scorer.score(batch)[batch.index(short)]
        assert together == pytest.approx(alone, abs=1e-6) and len(together) == 2
    assert scorer.score([long])[0] == pytest.approx(scorer.score([short, long])[1], abs=1e-6)


def test_scorer_rows_sample_several_responses_per_training_prompt(tmp_path):
    class Recording(FakeLLM):
        def generate(self, prompts, sps):
            self.temps = getattr(self, "temps", []) + [(len(prompts), sps[0].temperature, sps[0].n)]
            return super().generate(prompts, sps)

        def metrics(self):
            return {"tokens/generated": self.generated, "tokens/prefill": 0, "tokens/shared_by_fork": 0}

    job = ScorerJob(scorer={"data": {"prompts": 3, "responses": 2, "response_temperature": 0.5,
                                     "heldout_prompts": 2, "n": 2}})
    llm = Recording(p_err=0.35)
    train, held, _ = scorer_rows(job, llm, SimpleNamespace(dir=tmp_path), resume=False)
    assert len(train) == 6 and len(held) == 2
    assert [r.prompt for r in train[0::2]] == [r.prompt for r in train[1::2]]     # each prompt twice, adjacent
    assert llm.temps[0] == (6, 0.5, 1)                 # the training responses: at response_temperature
    assert [t[1] for t in llm.temps if t[2] == 1][1] == 1.0   # the held-out responses: at temperature


def test_logprob_scorer_is_the_models_probability_of_each_prefix():
    torch.manual_seed(0)
    model = tiny_gpt()
    scorer = LogProbScorer(model, TOK)
    prompt, response = P3.prompt, "3+4=7,7+5=12#"
    ids = torch.tensor([TOK.encode(prompt + response)])
    logp = torch.log_softmax(model(ids).float(), -1)[0]
    P = len(TOK.encode(prompt))
    lp = [logp[t - 1, ids[0, t]].item() for t in range(P, ids.shape[1])]     # each response token's log-prob
    cut = response.index(",")
    want = [math.exp(sum(lp[:cut + 1])), math.exp(sum(lp))]
    assert scorer.score([(prompt, response)])[0] == pytest.approx(want, rel=1e-5)
    assert scorer.score([(P4.prompt, "3+4=7,7+5=12,12+6=18#"), (prompt, response)])[1] == pytest.approx(want, rel=1e-5)


# -- the strategies -----------------------------------------------------------------------------------------
def test_aggregation_and_selection_by_hand():
    assert aggregate([0.9, 0.5], "last") == 0.5 and aggregate([0.9, 0.5], "min") == 0.5
    assert aggregate([0.9, 0.5], "prod") == pytest.approx(0.45) and aggregate([], "min") == 0.0
    s = Samples(P3.prompt, ["3+4=7,7+5=12#", "13#", "3+4=7,7+5=13#"], [13, 3, 13])
    assert pick_majority(s).answer == 13 and pick_majority(s).tokens == 29
    scores = [[0.9, 0.8], [0.4], [0.9, 0.5]]
    assert pick_best(s, scores, "last").answer == 12 and pick_best(s, scores, "last").correct
    assert pick_weighted(s, scores, "last").answer == 13                # 0.4 + 0.5 > 0.8
    assert pick_weighted(s, [[0.9, 0.95], [0.4], [0.9, 0.5]], "last").answer == 12


def test_oracle_best_of_n_equals_pass_at_n():
    llm = FakeLLM(p_err=0.35)
    problems = [Problem(tuple(random.Random(i).randint(0, 9) for _ in range(4))) for i in range(40)]
    prompts = [p.prompt for p in problems]
    samples = sample(llm, prompts, 4, seed=3)
    pass_n = sum(any(parse_prompt(s.prompt).gold == int(t.rstrip("#").split("=")[-1]) for t in s.texts)
                 for s in samples) / len(samples)
    res = best_of_n(llm, OracleScorer(), prompts, 4, seed=3)
    assert 0.3 < pass_n < 1.0
    assert sum(r.correct for r in res) / len(res) == pass_n
    picked = [pick_best(s, sc) for s, sc in zip(samples, score_samples(OracleScorer(), samples))]
    assert [r.text for r in picked] == [r.text for r in res]


def test_beam_of_width_one_is_greedy():
    llm = FakeLLM(err_at=1)
    prompts = [P3.prompt, P4.prompt, Problem((1, 2, 3, 4, 5)).prompt]
    g = greedy(llm, prompts)
    for n in (1, 4):   # at temperature 0 every expansion is the greedy step
        b = beam_search(llm, OracleScorer(), prompts, n=n, width=1, temperature=0.0)
        assert [r.text for r in b] == [r.text for r in g]
        assert [r.tokens for r in b] == [n * r.tokens for r in g]
    wide = beam_search(llm, OracleScorer(), prompts, n=4, width=4, temperature=0.0)   # root: 4, then 1 per beam
    assert [r.tokens for r in wide] == [4 * r.tokens for r in g] and [r.text for r in wide] == [r.text for r in g]
    real = LLM(tiny_gpt(std=0.5), TOK)
    rg = greedy(real, prompts, max_tokens=12)
    rb = beam_search(real, OracleScorer(), prompts, n=1, width=1, temperature=0.0, max_tokens=12)
    assert [r.text for r in rb] == [r.text for r in rg] and [r.tokens for r in rb] == [r.tokens for r in rg]


def test_dvts_with_one_subtree_is_beam_search():
    llm = FakeLLM(p_err=0.3)
    prompts = [Problem(tuple(random.Random(i).randint(0, 9) for _ in range(4))).prompt for i in range(12)]
    one = dvts(llm, OracleScorer(), prompts, n=4, subtrees=1, seed=5)
    beam = beam_search(llm, OracleScorer(), prompts, n=4, width=1, seed=5)
    assert [(r.text, r.tokens, r.score) for r in one] == [(r.text, r.tokens, r.score) for r in beam]


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_reports_its_budget(name):
    llm = FakeLLM(p_err=0.3)
    prompts = [P3.prompt, P4.prompt]
    res = run_strategy(name, llm, prompts, 4, OracleScorer(), width=2, seed=1)
    assert len(res) == 2 and all(r.tokens > 0 for r in res)
    assert sum(r.tokens for r in res) == llm.generated                   # every generated token is on the bill


# -- process rewards in RL --------------------------------------------------------------------------------------
def test_prm_env_rewards_and_ppo_places_them_at_step_boundaries():
    import rlpt.algorithms  # noqa: F401 - registers ppo
    from rlpt.envs.prm import ProcessRewardEnv
    from rlpt.framework.algorithm import make_algorithm
    from rlpt.framework.environment import Prompt
    from rlpt.framework.trajectory import Trajectory

    scorer = StepScorer(tiny_gpt(), TOK, "prm")
    torch.nn.init.constant_(scorer.head.bias, 0.0)                        # every step scores σ(0) = 0.5
    env = ProcessRewardEnv(scorer=scorer, process_coef=0.5)
    prompt = Prompt(P3.prompt, TOK.encode(P3.prompt), P3.gold)
    good, bad = env.verify(prompt, "3+4=7,7+5=12#"), env.verify(prompt, "3+4=7,7+5=13#")
    # each of the 2 steps: −0.5 · (1 − 0.5) / 2 = −0.125, at the delimiters (response positions 5 and 12)
    assert good.info["step_rewards"] == [[5, -0.125], [12, -0.125]] and good.reward == 0.75 and good.info["correct"]
    assert bad.reward == -0.25 and not bad.info["correct"]                # reward > 0 iff correct
    ids = TOK.encode("3+4=7,7+5=12#")
    t = Trajectory(prompt.ids, ids, torch.ones(len(ids)), torch.zeros(len(ids)), reward=good.reward,
                   info=dict(good.info), extra={"values": torch.zeros(len(ids))})
    make_algorithm({"name": "ppo", "whiten": False}, 1, 16).compute_advantages([[t]])
    # γ = λ = 1, V = 0: A_t = the rewards from t on; −0.125 at 5, −0.125 + 1 (the outcome) at the end
    want = [0.75] * 6 + [0.875] * 7
    assert t.advantage.tolist() == pytest.approx(want)
    with pytest.raises(Exception, match="needs a PRM"):
        ProcessRewardEnv(scorer=StepScorer(tiny_gpt(), TOK, "orm"))


# -- the jobs end to end -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prm_orm_search_and_prm_env_end_to_end(tiny_job, tiny_train_job, tmp_path, monkeypatch):
    import json

    from rlpt.cli import main
    from rlpt.config import load_config
    from rlpt.search import jobs
    from rlpt.sft import train_sft
    from rlpt.train import run_train

    from conftest import SFT_SHAPE, model_overrides

    _, sft_run, _ = train_sft(tiny_job("sft.steps=30", "sft.format=cot", "task.max_operands=3", "eval.max_tokens=16",
                                       "run.name=sft", "sft.batch_size=16"))
    runs = tmp_path / "runs"
    small = [*model_overrides(SFT_SHAPE), f"init_from={sft_run.dir}", f"run.out_dir={runs}", "run.progress=false",
             "task.max_operands=3", "scorer.data.prompts=12", "scorer.data.heldout_prompts=8", "scorer.data.n=2",
             "scorer.data.hard_operands=4", "scorer.data.hard_prompts=4", "scorer.data.max_tokens=16", "scorer.steps=4",
             "scorer.ckpt_every=2", "scorer.eval_every=2", "scorer.batch_size=4", "scorer.log_every=1"]
    job = load_config(jobs.ScorerJob, None, [*small, "run.name=prm_a"])
    scorer_a, run_a, final = jobs.train_scorer(job)
    rows = run_a.read_metrics()
    assert [r["step"] for r in rows if "prm/step_auroc_heldout" in r] == [0, 2, 4, 4]
    assert {"prm/step_auroc_4ops", "labels/mc_auroc_train", "tokens/shared_by_fork"} <= set(final)
    trl = json.loads((run_a.dir / "steps.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completions", "labels"} <= set(trl) and len(trl["completions"]) == len(trl["labels"])

    real, calls = jobs.bce_at, []

    def crash(*a, **k):                       # training calls only: the evals run under no_grad
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("simulated crash")
        return real(*a, **k)

    job_b = load_config(jobs.ScorerJob, None, [*small, "run.name=prm_b"])
    monkeypatch.setattr(jobs, "bce_at", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        jobs.train_scorer(job_b)
    monkeypatch.undo()
    scorer_b, _, final_b = jobs.train_scorer(job_b, resume=True)
    for a, b in zip(scorer_a.state_dict().values(), scorer_b.state_dict().values()):
        assert torch.equal(a, b)
    assert json.dumps(final_b) == json.dumps(final)                     # NaN AUROCs (one class) compare too

    common = [o for o in small if not o.startswith("scorer.data.n")]
    assert main(["orm", *common, "run.name=orm", f"trunk={sft_run.dir}"]) == 0
    assert main(["search", f"policy={sft_run.dir}", f"scorer={run_a.dir}", f"run.out_dir={runs}", "task.max_operands=3",
                 "search.n=[2]", "search.prompts=4", "search.width=2", "search.bootstrap=20",
                 "search.max_tokens=16"]) == 0
    res = [json.loads(x) for x in (runs / "search" / "results.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in res] == ["greedy", "majority", "best_of_n", "weighted_best_of_n", "beam", "dvts"]
    assert all(r["tokens_per_prompt"] > 0 for r in res) and (runs / "search" / "accuracy_vs_tokens.png").exists()
    assert main(["orm", "scorer.kind=prm", *common]) == 2                 # rlpt orm trains ORMs only
    # the ranking loss: needs several responses per prompt (a clear error otherwise), logs its pairs when it has them
    assert main(["orm", *common, "run.name=orm_rank1", "scorer.rank_coef=1"]) == 2
    pairs = []                                # per prompt one right and one wrong chain: one pair each
    for ops in [(1, 2), (3, 4, 5), (2, 2), (6, 1, 1), (4, 4)]:
        good = Problem(ops).cot()
        bad = good[:-2] + str((int(good[-2]) + 1) % 10) + "#"            # the last digit of the sum, off by one
        pairs += [(Problem(ops), good), (Problem(ops), bad)]
    save_rows(tmp_path / "pairs.jsonl", [StepRow(p.prompt, split_steps(t), [True] * len(split_steps(t)),
                                                 [1.0] * (len(split_steps(t)) - 1) + [float(outcome(p, t))],
                                                 true_step_labels(p, t)) for p, t in pairs])
    rows_file = tmp_path / "pairs.jsonl"
    assert main(["orm", *common, "run.name=orm_rank", "scorer.rank_coef=1", f"scorer.data.file={rows_file}",
                 f"scorer.data.heldout_file={rows_file}"]) == 0
    logged = [json.loads(x) for x in (runs / "orm_rank" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss/rank" in r]
    assert logged and all(r["rank/pairs"] == 2 and r["loss/rank"] > 0 for r in logged)   # batch 4: 2 prompts

    ppo = tiny_train_job("env.name=prm", f"env.model_path={run_a.dir}", "algorithm.name=ppo", "steps=2",
                         f"init_from={sft_run.dir}", *model_overrides(SFT_SHAPE), "rollout.max_tokens=16")
    _, run, _ = run_train(ppo)
    assert any("acc/heldout" in r for r in run.read_metrics())


def test_search_with_a_policy_as_generative_verifier(tmp_path, monkeypatch):
    """`rlpt search verifier=<policy>`: the strategies get that policy's own probability of each step (a
    LogProbScorer on its weights); a scorer and a verifier together, or neither for a strategy that needs one,
    are errors that say what to set."""
    from rlpt.checkpoint import save_checkpoint
    from rlpt.config import ConfigError, load_config
    from rlpt.search import jobs

    torch.manual_seed(0)
    model = tiny_gpt()
    ckpt = save_checkpoint(tmp_path / "policy", model, model.cfg.to_dict(), {"step": 0})
    base = [f"policy={ckpt}", f"run.out_dir={tmp_path / 'runs'}", "task.max_operands=3", "search.prompts=3",
            "search.n=[2]", "search.bootstrap=10", "search.max_tokens=12", "search.strategies=[best_of_n]"]
    seen, real = [], jobs.run_strategy
    monkeypatch.setattr(jobs, "run_strategy", lambda name, llm, prompts, n, scorer, *a: seen.append(scorer)
                        or real(name, llm, prompts, n, scorer, *a))
    _, rows = jobs.run_search(load_config(jobs.SearchJob, None, [*base, f"verifier={ckpt}"]))
    assert [r["strategy"] for r in rows] == ["best_of_n"] and len(seen) == 1
    pair = [(P3.prompt, "3+4=7,7+5=12#")]
    assert isinstance(seen[0], LogProbScorer) and seen[0].score(pair) == LogProbScorer(model, TOK).score(pair)
    with pytest.raises(ConfigError, match="not both"):
        jobs.run_search(load_config(jobs.SearchJob, None, [*base, f"verifier={ckpt}", f"scorer={ckpt}"]))
    with pytest.raises(ConfigError, match=r"need a scorer: set scorer=.* or verifier="):
        jobs.run_search(load_config(jobs.SearchJob, None, base))


def test_search_temperature_reaches_every_sampling_strategy(tmp_path, monkeypatch):
    from rlpt.checkpoint import save_checkpoint
    from rlpt.config import load_config
    from rlpt.search import jobs

    model = tiny_gpt()
    ckpt = save_checkpoint(tmp_path / "policy", model, model.cfg.to_dict(), {"step": 0})
    seen = []
    monkeypatch.setattr(jobs, "run_strategy", lambda name, llm, prompts, n, scorer, agg, width, temperature, *a:
                        seen.append((name, temperature)) or [SimpleNamespace(correct=False, tokens=1)] * len(prompts))
    jobs.run_search(load_config(jobs.SearchJob, None, [
        f"policy={ckpt}", f"run.out_dir={tmp_path / 'runs'}", "search.prompts=2", "search.n=[2]", "search.bootstrap=10",
        "search.strategies=[greedy,majority]", "search.temperature=0.5"]))
    assert seen == [("greedy", 0.5), ("majority", 0.5)]       # greedy ignores it (temperature 0 inside)


def test_env_process_coef_reaches_the_prm_env_and_only_it():
    from rlpt.config import ConfigError
    from rlpt.train import EnvConfig, env_model_kwargs, load_train_job

    assert env_model_kwargs(EnvConfig(name="prm", model_path="runs/prm", process_coef=0.25)) == \
        {"model_path": "runs/prm", "process_coef": 0.25}
    assert env_model_kwargs(EnvConfig(name="prm", model_path="runs/prm"))["process_coef"] == 0.5
    with pytest.raises(ConfigError, match=r"env.process_coef is set but env.name=arithmetic"):
        load_train_job(None, ["env.process_coef=0.3"])
    with pytest.raises(ConfigError, match=r"'env.process_coef': Input should be less than 1"):
        load_train_job(None, ["env.process_coef=1", "env.name=prm", "env.model_path=x"])


# -- examples/search_study.py rewrites docs/search.md but keeps the blocks it does not write (section 3b) ------
def test_search_study_page_keeps_the_marked_blocks_it_does_not_write():
    import importlib.util
    import sys
    from pathlib import Path
    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))           # what `python examples/search_study.py` puts first on the path
    try:
        spec = importlib.util.spec_from_file_location("example_search_study", examples / "search_study.py")
        study = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(study)
    finally:
        sys.path.remove(str(examples))
    old = ("# title\n<!-- keep:verdict -->\n**Verdict.** by hand\n<!-- /keep:verdict -->\n## 3. generated\n"
           "<!-- keep:3b -->\n## 3b. rerun\n| a | b |\n<!-- /keep:3b -->\n## 4. generated\n")
    kept = study.kept_blocks(old)
    assert kept == {"verdict": "<!-- keep:verdict -->\n**Verdict.** by hand\n<!-- /keep:verdict -->",
                    "3b": "<!-- keep:3b -->\n## 3b. rerun\n| a | b |\n<!-- /keep:3b -->",
                    "3c": "<!-- keep:3c -->\n<!-- /keep:3c -->"}
    new = f"# title\n{kept['verdict']}\n## 3. regenerated\n{kept['3b']}\n{kept['3c']}\n## 4. regenerated\n"
    assert study.kept_blocks(new) == kept                       # a second rewrite keeps them again
    assert study.kept_blocks("# a page without markers\n") == {  # a first page: empty blocks, markers in place
        "verdict": "<!-- keep:verdict -->\n<!-- /keep:verdict -->", "3b": "<!-- keep:3b -->\n<!-- /keep:3b -->",
        "3c": "<!-- keep:3c -->\n<!-- /keep:3c -->"}
