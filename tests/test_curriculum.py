"""The online curriculum in RL (`env.name=curriculum`) and the data-signal metrics every RL step logs.

Budget: the unit tests well under 0.1 s each (prompt-file draw frequencies 0.4 s); the `rlpt train` resume test
2 s and the one-step prompt-file run 1-2 s (AMD EPYC, 1 thread; 11 s and 5.5 s at a load average of 10), not `slow`.
"""
import itertools
import json
import shutil
from fractions import Fraction

import pytest
import torch

from rlpt.config import ConfigError
from rlpt.data.curriculum import Curriculum, OperandRamp
from rlpt.envs.curriculum import CurriculumConfig, CurriculumEnv, arithmetic_pool
from rlpt.framework.environment import ArithmeticEnv, env_class
from rlpt.framework.signal_metrics import bucket, signal, signal_metrics, wasted
from rlpt.framework.trajectory import Trajectory
from rlpt.gpt_mini.task import ArithmeticTask, parse_prompt
from rlpt.train import load_train_job, run_train

from conftest import TINY_RL


def group(rewards, prompt="<1+2>"):
    return [Trajectory([1], [2], torch.ones(1), torch.zeros(1), reward=float(r), info={"prompt": prompt})
            for r in rewards]


# -- the data-signal metrics ---------------------------------------------------------------------------------
def test_signal_metrics_by_hand():
    # K = 4: all pass, all fail, p̂ = 1/4, p̂ = 1/2
    m = signal_metrics([group([1, 1, 1, 1]), group([0, 0, 0, 0]), group([1, 0, 0, 0]), group([1, 1, 0, 0])])
    assert m["data/wasted_realised"] == (4 + 4 + 0 + 0) / 4
    # K(p^K + (1-p)^K): 4, 4, 4(1/256 + 81/256) = 1.28125, 4(1/16 + 1/16) = 0.5
    assert m["data/wasted_expected"] == pytest.approx((4 + 4 + 1.28125 + 0.5) / 4, abs=1e-12)
    assert m["data/signal"] == pytest.approx((0 + 0 + 3 / 16 + 1 / 4) / 4, abs=1e-12)   # (1/K)Σ(r - r̄)² = p̂(1-p̂)
    hist = {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith("data/passrate_hist/")}
    assert hist == {"0": 0.25, "0-25": 0.0, "25-50": 0.25, "50-75": 0.25, "75-100": 0.0, "100": 0.25}


def test_signal_metrics_without_pass_fail_rewards_report_only_the_realised_waste():
    assert signal_metrics([group([0.5, 2.0]), group([-1.0, -1.0])]) == {"data/wasted_realised": 1.0}
    assert signal_metrics([]) == {}


def test_bucket_edges():
    assert [bucket(p) for p in (0.0, 1e-9, 0.2499, 0.25, 0.5, 0.7499, 0.75, 1 - 1e-9, 1.0)] == \
        ["0", "0-25", "0-25", "25-50", "50-75", "50-75", "75-100", "75-100", "100"]


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_realised_waste_is_unbiased_and_the_plug_in_is_not(k):
    """Over {0,1}^K with exact Bernoulli(p) weights: E[K·1[degenerate]] = K(p^K + (1-p)^K) exactly; the plug-in
    K(p̂^K + (1-p̂)^K) is ≥ the realised count on every outcome; E[p̂(1-p̂)] = p(1-p)(K-1)/K."""
    p = Fraction(3, 10)
    e_realised = e_plugin = e_signal = Fraction(0)
    for rs in itertools.product((0, 1), repeat=k):
        w = p ** sum(rs) * (1 - p) ** (k - sum(rs))
        ph = Fraction(sum(rs), k)
        realised = k * (len(set(rs)) == 1)
        plugin = k * (ph ** k + (1 - ph) ** k)
        assert plugin >= realised
        e_realised, e_plugin, e_signal = e_realised + w * realised, e_plugin + w * plugin, e_signal + w * ph * (1 - ph)
    assert e_realised == k * (p ** k + (1 - p) ** k)
    assert float(e_realised) == pytest.approx(wasted(0.3, k), abs=1e-12)
    assert e_plugin > e_realised
    assert e_signal == p * (1 - p) * (k - 1) / k and float(e_signal) == pytest.approx(signal(0.3, k), abs=1e-12)


# -- the operand ramp ----------------------------------------------------------------------------------------
def test_operand_ramp_widens_on_a_full_window_at_threshold():
    r = OperandRamp(start=2, stop=4, threshold=0.75, window=4)
    assert not r.update([(2, [1, 1, 0])]) and r.pass_rate() == pytest.approx(2 / 3)     # window not full
    assert r.update([(3, [0, 0]), (2, [1])]) and r.width == 3 and r.pass_rate() is None  # [1,1,0,1]: 0.75, widen
    assert not r.update([(2, [1, 1, 1, 1]), (3, [1, 0])])                                # count 2 no longer counts
    assert r.update([(3, [1, 1, 1])]) and r.width == 4       # window [0, 1, 1, 1] (the last 4): 0.75
    assert not r.update([(4, [1] * 8)]) and r.width == 4     # at task.max_operands: stays
    s = OperandRamp(2, 3, 0.9, 2)
    assert not s.update([(2, [1, 0])]) and not s.update([(2, [0, 1])]) and s.width == 2   # 0.5 < 0.9
    with pytest.raises(ValueError, match="start <= stop"):
        OperandRamp(5, 4)


def test_curriculum_sample_among_a_subset():
    c = Curriculum(["a", "b", "c", "d"], seed=1)
    assert sorted(c.sample(3, among=["b", "d"])) == ["b", "d"]
    c.update([("a", [1.0] * 198)])                      # p̂(a) = 199/200: p̂(1-p̂) = 0.004975, under the floor
    assert c.weight("a") == 0.01 and c.weight("b") == 0.25
    firsts = [c.sample(4)[0] for _ in range(4000)]      # P(first = a) = 0.01 / (0.01 + 3 · 0.25) = 0.01316
    assert firsts.count("a") / 4000 == pytest.approx(0.01 / 0.76, abs=0.006)     # ±3.3σ


def test_strata_share_a_pooled_pass_rate():
    c = Curriculum(["a", "b", "c"], strata=[1, 1, 2], prior=2.0)
    c.update([("a", [1, 1, 1, 1])])                     # stratum 1: q = (4 + 1)/(4 + 2) = 5/6; stratum 2: 1/2
    assert c.p_hat("a") == pytest.approx((4 + 2 * 5 / 6) / (4 + 2), abs=1e-15)    # 17/18
    assert c.p_hat("b") == pytest.approx(5 / 6, abs=1e-15) and c.p_hat("c") == 0.5    # unseen: its stratum's rate
    c.update([("b", [0, 0, 0, 0])])                     # q1 = (4 + 0 + 1)/(8 + 2) = 1/2
    assert c.p_hat("a") == pytest.approx((4 + 1) / 6, abs=1e-15) and c.p_hat("b") == pytest.approx(1 / 6, abs=1e-15)
    r = Curriculum(["a", "b", "c"], strata=[1, 1, 2], prior=2.0)
    r.load_state_dict(c.state_dict())
    assert [r.p_hat(x) for x in "abc"] == [c.p_hat(x) for x in "abc"]
    with pytest.raises(ValueError, match="one stratum per prompt"):
        Curriculum(["a", "b"], strata=[1])


# -- the env -------------------------------------------------------------------------------------------------
def env(start=2, **cfg):
    return CurriculumEnv(ArithmeticTask(max_operands=4), seed=3,
                         curriculum=CurriculumConfig(start_operands=start, **cfg))


def test_pool_is_distinct_training_prompts_per_count():
    task = ArithmeticTask(max_operands=4)
    pool = arithmetic_pool(task, 40, seed=0)
    counts = [len(p.operands) for p in pool]
    assert counts.count(2) == 40 and counts.count(3) == 40 and counts.count(4) == 40
    assert len(set(pool)) == len(pool) and not any(task.is_heldout(p) for p in pool)
    assert arithmetic_pool(task, 40, seed=0) == pool and arithmetic_pool(task, 40, seed=1) != pool
    assert len([p for p in arithmetic_pool(task, 500, seed=0) if len(p.operands) == 2]) < 100   # only 100 exist


def test_env_draws_distinct_active_prompts_and_the_ramp_opens_new_ones():
    e = env(pool=30, threshold=0.5, window=8, probe=0)          # probe 0: the ramp reads the pool's groups
    assert env_class("curriculum") is CurriculumEnv and isinstance(e, ArithmeticEnv)
    step = [e.reset() for _ in range(12)]
    assert len({p.text for p in step}) == 12 and all(len(p.meta["operands"]) == 2 for p in step)
    assert len(e.reset("heldout").meta["operands"]) in (2, 3, 4)         # eval: the whole task
    m = e.observe([group([1, 1, 1, 1], p.text) for p in step[:2]])  # 8 samples at width 2, all pass
    assert m["curriculum/width"] == 3.0 and m["curriculum/widened"] == 1.0 and m["curriculum/active"] == 60.0
    # count 2 pooled: q = (8 + 1)/(8 + 2); a prompt with 4 passes: (4 + 2q)/(4 + 2); an unseen one: q
    assert e.curriculum.p_hat(step[0].text) == pytest.approx((4 + 2 * 0.9) / 6, abs=1e-15) and e.order == []
    assert e.curriculum.p_hat(step[5].text) == pytest.approx(0.9, abs=1e-15)
    # every 2-operand prompt solved 48 times (p̂ = 49/50, weight 0.0196) against 30 unseen 3-operand ones (0.25):
    # P(a draw is 3-operand) ≈ 7.5 / 8.09 = 0.93 while they last
    two = [x for x in e.active() if x.count("+") == 1]
    e.observe([group([1] * 48, x) for x in two])
    drawn = [len(e.reset().meta["operands"]) for _ in range(15)]
    assert drawn.count(3) >= 12, drawn


def test_the_ramp_reads_only_the_probes():
    e = env(pool=30, threshold=0.5, window=8, probe=2)
    step = [e.reset() for _ in range(6)]
    assert e.probes == [step[0].text, step[1].text] and all(len(p.meta["operands"]) == 2 for p in step)
    assert not any(e.task.is_heldout(parse_prompt(p.text)) for p in step)
    fresh = env(pool=30, threshold=0.5, window=8, probe=200)   # fresh problems, not the pool's: most 2-operand sums
    assert len(set(fresh.reset().text for _ in range(200)) - set(fresh.problems)) > 30
    assert e.observe([group([1, 1, 1, 1], p.text) for p in step[2:]])["curriculum/widened"] == 0.0   # not probes
    assert e.ramp.pass_rate() is None and e.probes == []
    step = [e.reset() for _ in range(6)]
    assert e.observe([group([1, 1, 1, 1], p.text) for p in step[:2]])["curriculum/widened"] == 1.0
    f = env(pool=30, threshold=0.5, window=8, probe=0)        # probe 0: every widest-count group counts
    step = [f.reset() for _ in range(6)]
    assert f.observe([group([1, 1, 1, 1], p.text) for p in step[4:]])["curriculum/widened"] == 1.0


def test_env_state_round_trips_to_the_same_draws():
    a = env(pool=20, threshold=0.5, window=4)
    for _ in range(3):
        ps = [a.reset() for _ in range(5)]
        a.observe([group([1, 0, 1, 1], p.text) for p in ps])
    a.reset()                                           # mid-step: the rest of the order is state too
    saved = a.state_dict()
    b = env(pool=20, threshold=0.5, window=4)
    b.load_state_dict(saved)
    assert b.ramp.width == a.ramp.width == 4
    for _ in range(3):
        pa, pb = [a.reset() for _ in range(5)], [b.reset() for _ in range(5)]
        assert [p.text for p in pa] == [p.text for p in pb]
        assert a.observe([group([1, 0, 0, 0], p.text) for p in pa]) == b.observe([group([1, 0, 0, 0], p.text)
                                                                                  for p in pb])


# -- the curriculum over a prompt file ---------------------------------------------------------------------
def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_rows(task, n, seed=0, **meta):
    """n distinct training prompts of `task` as prompt rows (what rlpt data make-arith writes)."""
    import random
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:
        p = task.sample(rng, "train")
        if p not in seen:
            seen.add(p)
            rows.append({"id": f"r{len(rows)}", "prompt": p.prompt, "answer": str(p.gold), "metadata": dict(meta)})
    return rows


def test_curriculum_over_a_prompt_file_draws_its_rows_weighted_by_their_pass_rates(tmp_path):
    task = ArithmeticTask(max_operands=3)
    rows = train_rows(task, 12)
    for i, r in enumerate(rows):      # curate's metadata: 4 prompts solved 8/8, 4 at 4/8, 4 at 0/8
        r["metadata"] = {"p_hat": [1.0, 0.5, 0.0][i % 3], "k": 8}
    path = write_rows(tmp_path / "curated.jsonl", rows)
    e = CurriculumEnv(task, seed=0, curriculum=CurriculumConfig(prompts=path, stratify=False, probe=0))
    assert list(e.problems) == [r["prompt"] for r in rows]                     # the file's rows are the pool
    # warm start: s = p̂·8, n = 8, Laplace prior α = 2 at q = 1/2: (8+1)/10, (4+1)/10, (0+1)/10
    assert [e.curriculum.p_hat(r["prompt"]) for r in rows[:3]] == pytest.approx([0.9, 0.5, 0.1], abs=1e-15)
    # weights 0.09, 0.25, 0.09: the middle third is drawn first with P = 4·0.25 / (4·0.25 + 8·0.09) = 0.581
    where = {r["prompt"]: i % 3 for i, r in enumerate(rows)}
    firsts = []
    for _ in range(3000):
        firsts.append(where[e.reset().text])
        e.order = []                  # a fresh weighted order (observe() does this between steps)
    assert firsts.count(1) / 3000 == pytest.approx(1 / 1.72, abs=0.03)        # ±3.3σ
    assert {len(e.reset().text) for _ in range(11)} <= {5, 7}                   # 2-3 operands, the file's
    cold = CurriculumEnv(task, seed=0, curriculum=CurriculumConfig(prompts=path, stratify=False, probe=0,
                                                                  warm_start=False))
    assert cold.curriculum.p_hat(rows[0]["prompt"]) == 0.5
    uniform = CurriculumEnv(task, seed=0, curriculum=CurriculumConfig(prompts=path, floor=0.25, probe=0))
    assert {uniform.curriculum.weight(x) for x in uniform.problems} == {0.25}  # floor 0.25: a uniform draw
    # p̂ then moves with the groups observed, and the state round-trips
    step = [e.reset() for _ in range(4)]
    e.observe([group([0, 0, 0, 1], p.text) for p in step])
    b = CurriculumEnv(task, seed=0, curriculum=CurriculumConfig(prompts=path, stratify=False, probe=0))
    b.load_state_dict(e.state_dict())
    assert [b.reset().text for _ in range(12)] == [e.reset().text for _ in range(12)]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "what is 3+4?", "answer": "7"}, "is not an arithmetic prompt"),
    ({"prompt": "<3+4>", "answer": "8"}, "answer '8' is not the sum 7"),
    ({"prompt": "<1+2+3+4+5>", "answer": "15"}, "has 5 operands, outside task.min_operands"),
    ({"prompt": "<2+3>", "answer": "5", "metadata": {"p_hat": 1.5, "k": 8}}, "is not a pass rate"),
])
def test_a_bad_prompt_file_row_names_the_file_and_row(tmp_path, row, message):
    task = ArithmeticTask(max_operands=3)
    ok = train_rows(task, 2)
    path = write_rows(tmp_path / "set.jsonl", [*ok, {"id": "bad", **row}])
    with pytest.raises(ValueError, match=message) as e:
        CurriculumEnv(task, curriculum=CurriculumConfig(prompts=path))
    assert "set.jsonl, row id 'bad'" in str(e.value)


def test_a_prompt_file_may_not_hold_a_heldout_problem_or_a_prompt_twice(tmp_path):
    task = ArithmeticTask(max_operands=3)
    held = task.heldout_set(1)[0]
    path = write_rows(tmp_path / "leak.jsonl", [{"id": "h", "prompt": held.prompt, "answer": str(held.gold)}])
    with pytest.raises(ValueError, match="row id 'h'.* is in the task's held-out split"):
        CurriculumEnv(task, curriculum=CurriculumConfig(prompts=path))
    twice = train_rows(task, 1)
    path = write_rows(tmp_path / "twice.jsonl", [*twice, {**twice[0], "id": "again"}])
    with pytest.raises(ValueError, match="row id 'again'.* is also row id 'r0'"):
        CurriculumEnv(task, curriculum=CurriculumConfig(prompts=path))


def test_rlpt_train_reads_env_curriculum_prompts(tmp_path):
    rows = train_rows(ArithmeticTask(max_operands=3), 6)
    path = write_rows(tmp_path / "six.jsonl", rows)
    job = tiny(tmp_path, "env.name=curriculum", f"env.curriculum.prompts={path}", "env.curriculum.probe=0",
               "steps=1")
    ctl, run, _ = run_train(job)
    assert set(ctl.env.curriculum.ids) == {r["prompt"] for r in rows}
    assert sum(ctl.env.curriculum.n) == 4 * 4            # the step's 4 groups of K = 4, all from the file
    with pytest.raises(ConfigError, match="no prompt file"):
        tiny(tmp_path, "env.name=curriculum", f"env.curriculum.prompts={tmp_path / 'none.jsonl'}")


def tiny(tmp_path, *overrides):
    return load_train_job(None, [*TINY_RL, f"run.out_dir={tmp_path / 'runs'}", *overrides])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="env.curriculum.start_operands=7"):
        tiny(tmp_path, "env.name=curriculum", "env.curriculum.start_operands=7")
    with pytest.raises(ConfigError, match="env.curriculum.floor"):
        tiny(tmp_path, "env.name=curriculum", "env.curriculum.floor=0.5")
    with pytest.raises(ConfigError, match="env.curriculum.pool"):
        tiny(tmp_path, "env.name=curriculum", "env.curriculum.pool=0")
    with pytest.raises(ConfigError, match="env.name=arithmetic does not read it"):
        tiny(tmp_path, "env.curriculum.window=8")
    assert tiny(tmp_path, "env.name=curriculum", "env.curriculum.start_operands=2").env.curriculum.start_operands == 2


def test_rlpt_train_with_the_curriculum_resumes_bit_identically(tmp_path):
    """A crash after step 5 of 6 with the step-3 checkpoint left: the resumed run equals the uninterrupted one
    (parameters torch.equal, every metrics row), through a widening of the ramp."""
    cur = ["env.name=curriculum", "env.curriculum.start_operands=2", "env.curriculum.threshold=0.1",
           "env.curriculum.window=8", "env.curriculum.pool=40", "env.curriculum.probe=2", "steps=6", "ckpt_every=3",
           "run.seed=1"]     # seed 1: steps 4 and 5 have mixed groups and the ramp widens at step 5, after the resume
    ctl_a, run_a, _ = run_train(tiny(tmp_path, "run.name=straight", *cur))
    broken = tiny(tmp_path, "run.name=resumed", f"init_from={run_a.dir / 'sft'}", *cur)
    ctl_b, run_b, _ = run_train(broken)
    shutil.rmtree(run_b.dir / "checkpoints" / "step_00000006")
    (run_b.dir / "checkpoints" / "latest").write_text("step_00000003")
    ctl_b, run_b, _ = run_train(broken, resume=True)
    for (k, a), b in zip(ctl_a.trainer.model.state_dict().items(), ctl_b.trainer.model.state_dict().values()):
        assert torch.equal(a, b), k

    def rows(run):
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "mem/"))}
                for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    ra, rb = rows(run_a), rows(run_b)
    assert ra[1:] == rb[1:]
    assert ctl_a.env.state_dict()["curriculum"] == ctl_b.env.state_dict()["curriculum"]
    widths = [r["curriculum/width"] for r in ra if "curriculum/width" in r]
    assert widths[0] == 2.0 and widths[-1] == 3.0      # the ramp widened during the run (resumed across it or not)
    assert any(r["step"] > 3 and r.get("step/skipped") == 0.0 for r in ra)     # resumed steps trained
    assert all("data/wasted_realised" in r and "data/passrate_hist/0" in r for r in ra if "reward/mean" in r)


def test_the_recipe_loads():
    job = load_train_job("recipes/curriculum_arith.yaml", [])
    assert job.env.name == "curriculum" and job.env.curriculum.start_operands == 4 and job.task.max_operands == 6


def test_the_controller_hands_each_step_groups_to_the_env_and_logs_the_data_metrics():
    import copy

    from rlpt.framework.algorithm import make_algorithm
    from rlpt.framework.controller import Controller
    from rlpt.framework.reference import Reference
    from rlpt.framework.rollout import Rollout
    from rlpt.framework.trainer import Trainer
    from rlpt.framework.weight_sync import WeightSyncer
    from rlpt.gpt_mini.generate import SamplingParams

    from conftest import TOK, ParityEnv, tiny_gpt

    class Seen(ParityEnv):
        calls: list = []

        def observe(self, groups):
            self.calls.append([[t.reward for t in g] for g in groups])
            return {"env/seen": float(len(groups))}

    policy = tiny_gpt()
    env = Seen(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    rollout = Rollout(copy.deepcopy(policy), TOK, 3, SamplingParams(max_tokens=6, temperature=1.0))
    trainer = Trainer(policy, torch.optim.AdamW(policy.parameters(), lr=1e-2), None, 1.0, 0, 1, 1, temperature=1.0)
    ctl = Controller(rollout, env, Reference(policy, temperature=1.0), make_algorithm({"name": "grpo"}, 4, 6),
                     trainer, WeightSyncer(1), 4, TOK.pad_id)
    m = ctl.step()
    assert len(env.calls) == 1 and len(env.calls[0]) == 3 and all(len(g) == 4 for g in env.calls[0])
    assert m["env/seen"] == 3.0
    expected = signal_metrics([group(r) for r in env.calls[0]])
    assert {k: m[k] for k in expected} == expected
    assert m["data/wasted_realised"] == 4 * m["groups/degenerate_frac"]


def test_dapo_hands_the_env_the_groups_its_filter_dropped_too(tmp_path):
    """DAPO's GroupFilter drops the degenerate groups before training; the env must still see them, or a curriculum
    never learns that a solved prompt is solved. A random tiny policy fails almost every sample, so the filter drops
    nearly every group and redraws up to its cap: the curriculum's counts must hold K samples per group drawn."""
    rows = train_rows(ArithmeticTask(max_operands=3), 40)
    path = write_rows(tmp_path / "forty.jsonl", rows)
    job = tiny(tmp_path, "env.name=curriculum", f"env.curriculum.prompts={path}", "env.curriculum.probe=0",
               "steps=1", "algorithm.name=dapo")
    ctl, run, _ = run_train(job)
    step = next(json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()
                if "sampling/groups_drawn" in line)
    assert step["sampling/groups_drawn"] > job.rollout.prompts_per_step      # some groups were dropped and redrawn
    assert sum(ctl.env.curriculum.n) == job.rollout.k * step["sampling/groups_drawn"]
    assert len(ctl.rollout.drawn) == step["sampling/groups_drawn"]
