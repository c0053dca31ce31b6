"""The arithmetic task behind an online curriculum (lesson 18a online): `env.name=curriculum`.

    pool      `env.curriculum.pool` distinct training prompts per operand count, task.min_operands..max_operands;
              or the rows of a JSONL prompt set (`env.curriculum.prompts`: rlpt data make-arith, or the
              curated.jsonl of rlpt data curate), each row's counts started from the p̂ and K curate measured
              (`warm_start`); `floor=0.25` makes every weight 0.25, a uniform draw (the control of a study)
    active    the pool's prompts with at most `width` operands (rlpt.data.curriculum.OperandRamp)
    draw      each step, a weighted random order of the active prompts, P ∝ max(p̂(1-p̂), floor); the rollout
              takes prompts from its front, so a step's prompts are distinct (rlpt.data.curriculum.Curriculum);
              p̂ of a prompt pools its own groups with its operand count's rate (`stratify`, `prior`)
    probe     the first `probe` prompts of a step are fresh training problems of the widest count, drawn
              uniformly from the task (not the pool); the ramp reads only their groups. The weighted draws cannot
              measure a count: among unsolved prompts the sampler favours those that passed (p(1-p) rises with p
              below 1/2), so their pass rate overstates the count's (measured: the ramp opened 6 operands at a
              5-operand greedy accuracy of 0.15); and the pool's prompts are trained on again and again, so their
              pass rate would read memorisation too. Probes train like the others.
    observe   after the step's advantages, the controller hands the groups back: each prompt's p̂ takes its K
              rewards, the ramp the probes' rewards; the next step draws with the new weights

Why a separate env and not a `curriculum:` switch on `arithmetic`: ArithmeticEnv lives in rlpt/framework (floor 3)
and the curriculum in rlpt/data (floor 4), which the framework cannot import; and a named env leaves the plain
task's draws (and every resume test and result built on them) untouched. Verification and the held-out set are
the arithmetic task's, all operand counts up to task.max_operands, so `acc/heldout` shows what the ramp reached.

To extend a policy past its demonstrations: SFT on task.max_operands=4, then RL from it with task.max_operands=6
and env.curriculum.start_operands=4: the 5-operand prompts open when the 4-operand ones pass at `threshold`
(recipes/curriculum_arith.yaml).

The pass-rate table, the sampler's RNG, the ramp's width and window and the rest of the step's order are in
`state_dict`, so a resumed `rlpt train` run draws the same prompts as an uninterrupted one.

Every group the rollout drew is observed, the ones an algorithm's GroupFilter dropped (DAPO's dynamic sampling)
too: the rollout keeps them in `Rollout.drawn` and the controller hands those to `observe`, so a solved prompt's
p̂ moves even when its group never reaches the loss.
"""
from __future__ import annotations

import random

from pydantic import Field

from rlpt.config import Section
from rlpt.data.curriculum import Curriculum, OperandRamp
from rlpt.framework.environment import ArithmeticEnv, Prompt, register_env
from rlpt.gpt_mini.task import ArithmeticTask, Problem, parse_prompt
from rlpt.gpt_mini.tokenizer import CharTokenizer


class CurriculumConfig(Section):
    """`env.curriculum.*`: read by env.name=curriculum only."""
    pool: int = Field(256, ge=1, description="distinct training prompts per operand count (fewer where the "
                                             "task's training split has fewer)")
    floor: float = Field(0.01, gt=0, le=0.25, description="least sampling weight: p̂(1-p̂) is at most 0.25")
    decay: float = Field(1.0, gt=0, le=1, description="γ: a prompt's older counts are multiplied by it at each of "
                                                      "its groups; 1 keeps all")
    stratify: bool = Field(True, description="share pass rates among the prompts of one operand count: an unseen "
                                             "or rarely seen prompt reads its count's pooled rate")
    prior: float = Field(2.0, gt=0, description="α: pseudo-samples at the count's pooled rate (at 1/2 without "
                                                "stratify) added to a prompt's own")
    start_operands: int = Field(0, ge=0, description="widest operand count at the start; 0 = task.max_operands "
                                                     "(no ramp)")
    threshold: float = Field(0.8, gt=0, le=1, description="widen when the pass rate at the widest count reaches it")
    window: int = Field(64, ge=1, description="samples at the widest count the pass rate is measured over")
    probe: int = Field(4, ge=0, description="fresh problems of the widest count per step, the only ones the ramp "
                                            "measures; 0 = the pool's widest-count groups (biased upwards)")
    prompts: str | None = Field(None, description="a JSONL prompt set whose rows are the pool (instead of `pool` "
                                                  "draws of the task): arithmetic prompts, answer = the sum, none "
                                                  "in the task's held-out split")
    warm_start: bool = Field(True, description="with `prompts`: a row's metadata p_hat and k (rlpt data curate's) "
                                               "start its counts at s = p̂·k, n = k")


def arithmetic_pool(task: ArithmeticTask, per_count: int, seed: int) -> list[Problem]:
    """`per_count` distinct training problems for each operand count of the task (fewer if the split has fewer),
    the same for the same task and seed on any machine."""
    rng, pool = random.Random(f"curriculum-pool:{seed}"), []
    for count in range(task.min_operands, task.max_operands + 1):
        seen: set[Problem] = set()
        for _ in range(50 * per_count + 1000):
            if len(seen) == per_count:
                break
            p = Problem(tuple(rng.randint(task.min_value, task.max_value) for _ in range(count)))
            if p not in seen and not task.is_heldout(p):
                seen.add(p)
                pool.append(p)
    return pool


def file_pool(path: str, task: ArithmeticTask) -> tuple[list[Problem], list[tuple[float, float] | None]]:
    """The problems of a prompt set, in file order, and each row's measured (p̂·k, k) from its metadata (None where
    the row has none). Every row must be an arithmetic prompt of the task's operand counts whose answer is its sum
    and which is not in the task's held-out split (training on it would leak into acc/heldout); a row that is not
    is an error naming the file and the row's id."""
    from rlpt.data.prompts import read_prompts
    problems, counts, seen = [], [], {}
    for r in read_prompts(path):
        where = f"{path}, row id {r.id!r}"
        try:
            p = parse_prompt(r.prompt)
        except ValueError:
            raise ValueError(f"{where}: {r.prompt[:60]!r} is not an arithmetic prompt like '<3+4+5>' "
                             "(env.curriculum.prompts takes the arithmetic task's prompts)") from None
        if r.answer.strip() != str(p.gold):
            raise ValueError(f"{where}: answer {r.answer[:20]!r} is not the sum {p.gold} of {r.prompt}")
        if not task.min_operands <= len(p.operands) <= task.max_operands:
            raise ValueError(f"{where}: {r.prompt} has {len(p.operands)} operands, outside task.min_operands.."
                             f"task.max_operands ({task.min_operands}..{task.max_operands}): widen the task")
        if task.is_heldout(p):
            raise ValueError(f"{where}: {r.prompt} is in the task's held-out split: drop it (rlpt data curate "
                             "--eval HELD.jsonl) or it leaks into acc/heldout")
        if r.prompt in seen:
            raise ValueError(f"{where}: {r.prompt} is also row id {seen[r.prompt]!r}: a prompt set's prompts "
                             "must be distinct")
        seen[r.prompt] = r.id
        problems.append(p)
        m = r.metadata
        if "p_hat" in m and "k" in m:
            if not (isinstance(m["k"], int) and m["k"] >= 1 and 0 <= m["p_hat"] <= 1):
                raise ValueError(f"{where}: metadata p_hat={m['p_hat']!r}, k={m['k']!r} is not a pass rate of k >= 1 "
                                 "samples")
            counts.append((m["p_hat"] * m["k"], float(m["k"])))
        else:
            counts.append(None)
    if not problems:
        raise ValueError(f"{path} holds no prompt row: env.curriculum.prompts needs at least one")
    return problems, counts


@register_env("curriculum")
class CurriculumEnv(ArithmeticEnv):
    """The arithmetic task with its training prompts drawn by an online curriculum (module doc)."""

    def __init__(self, task: ArithmeticTask | None = None, seed: int = 0, tokenizer: CharTokenizer | None = None,
                 curriculum: CurriculumConfig | None = None):
        super().__init__(task, seed, tokenizer)
        cfg = self.cfg = curriculum or CurriculumConfig()
        t = self.task
        start = cfg.start_operands or t.max_operands
        if not t.min_operands <= start <= t.max_operands:
            raise ValueError(f"env.curriculum.start_operands={cfg.start_operands} must lie in task.min_operands.."
                             f"task.max_operands ({t.min_operands}..{t.max_operands}), or be 0 for no ramp")
        counts = None
        if cfg.prompts:
            problems, measured = file_pool(cfg.prompts, t)
            if cfg.warm_start and any(c is not None for c in measured):
                counts = [c or (0.0, 0.0) for c in measured]
        else:
            problems = arithmetic_pool(t, cfg.pool, seed)
        self.problems = {p.prompt: p for p in problems}
        strata = [len(p.operands) for p in self.problems.values()] if cfg.stratify else None
        self.curriculum = Curriculum(list(self.problems), floor=cfg.floor, decay=cfg.decay, seed=seed,
                                     strata=strata, prior=cfg.prior, counts=counts)
        self.ramp = OperandRamp(start, t.max_operands, cfg.threshold, cfg.window)
        self.probe_rng = random.Random(f"curriculum-probe:{seed}")
        self.order: list[str] = []      # the rest of this step's order: probes first, then weighted
        self.probes: list[str] = []     # this step's probes
        if not self.active():
            where = cfg.prompts or "the task's training split"
            raise ValueError(f"{where} has no prompt of at most {start} operands: widen task.max_value (or the "
                             "prompt set) or raise env.curriculum.start_operands")

    def active(self) -> list[str]:
        return [x for x, p in self.problems.items() if len(p.operands) <= self.ramp.width]

    def reset(self, split: str = "train") -> Prompt:
        if split != "train":
            return super().reset(split)
        if not self.order:
            active = self.active()
            probes = [self._fresh(self.ramp.width).prompt for _ in range(self.cfg.probe)]
            self.probes += probes
            taken = set(probes)
            rest = [x for x in active if x not in taken]
            self.order = probes + self.curriculum.sample(len(rest), among=rest)
        x = self.order.pop(0)
        return self._prompt(self.problems.get(x) or parse_prompt(x))

    def _fresh(self, count: int) -> Problem:
        """A training problem of `count` operands, uniform over the task's values (a probe)."""
        t = self.task
        for _ in range(100_000):
            p = Problem(tuple(self.probe_rng.randint(t.min_value, t.max_value) for _ in range(count)))
            if not t.is_heldout(p):
                return p
        raise RuntimeError(f"no training problem of {count} operands: check task.heldout_frac={t.heldout_frac}")

    def observe(self, groups: list) -> dict:
        outcomes = [(g[0].info["prompt"], [float(t.reward) for t in g]) for g in groups if g and "prompt" in g[0].info]
        self.curriculum.update([(x, r) for x, r in outcomes if x in self.problems])
        probes = set(self.probes)
        measured = [(x, r) for x, r in outcomes if (x in probes if self.cfg.probe else x in self.problems)]
        widened = self.ramp.update([(x.count("+") + 1, r) for x, r in measured])
        self.order, self.probes = [], []    # the next step draws with the new weights (and width)
        active = self.active()
        out = {"curriculum/width": float(self.ramp.width), "curriculum/widened": float(widened),
               "curriculum/active": float(len(active)),
               "curriculum/p_hat_mean": sum(self.curriculum.p_hat(x) for x in active) / len(active)}
        if (rate := self.ramp.pass_rate()) is not None:
            out["curriculum/width_pass_rate"] = rate
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "curriculum": self.curriculum.state_dict(), "ramp": self.ramp.state_dict(),
                "order": list(self.order), "probes": list(self.probes), "probe_rng": self.probe_rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.curriculum.load_state_dict(state["curriculum"])
        self.ramp.load_state_dict(state["ramp"])
        self.order, self.probes = list(state["order"]), list(state["probes"])
        self.probe_rng.setstate(state["probe_rng"])


def curriculum_kwargs(env_name: str, cfg: CurriculumConfig) -> dict:
    """`env.curriculum` as the keyword env.name=curriculum takes; set for any other env, an error naming the key."""
    if env_name == "curriculum":
        return {"curriculum": cfg}
    if cfg != CurriculumConfig():
        raise ValueError(f"env.curriculum.* is set but env.name={env_name} does not read it: set env.name=curriculum "
                         "or remove the env.curriculum keys")
    return {}
