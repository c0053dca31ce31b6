"""A Bradley–Terry reward model: the amortised human of RLHF (lesson 15).

    r̂(x, y) = w · h_last + b        h_last = the trunk's final hidden state at the last real token of x ⧺ y
    P(y_w ≻ y_l | x) = σ(r̂(x, y_w) − r̂(x, y_l));   L_RM = −E log σ(r̂_w − r̂_l)

The trunk starts from the SFT policy (InstructGPT, Ouyang et al. 2022: the RM is initialised from
π_SFT), so it already reads the task; the head starts at zero, so every score starts at 0 (lesson 15's
widget). Only differences of scores mean anything: BT leaves an additive offset free. After
training, the offset is pinned so that 0 lies halfway between the mean score of the held-out
chosen and rejected responses; then `reward > 0` reads "looks preferred", which is what `rlpt
train`'s `acc/heldout` (fraction of reward > 0) counts when the RM is the env. Healthy held-out
|r̂_w − r̂_l| is 0.5–4 (σ(1) = 0.73, σ(3) = 0.95): much larger is overconfident, much smaller undertrained.

Pairs: a JSONL file (rlpt.preference.data.load_pairs) or sampled from the SFT policy and ranked by a
named preference (`PREFERENCES`): `correct` (the verifier) or `human`, the hidden "human" taste of
the RLHF demo: right and concise ≻ right and verbose ≻ wrong. Held-out pairs come from held-out prompts.

The `reward_model` env (any algorithm can train against it) scores each response with the RM and
keeps the gold verdict in `info["correct"]`, so over-optimisation is visible: reward up, gold flat.
`math_reward_model` is the same over a prompt set (data.prompts, the math env's rows) in the model's own
tokenizer, the math verifier's verdict in `info["correct"]`; its RM comes from a recipe's rm stage on that set.

    rlpt rm init_from=runs/sft_cot [rm.pairs.preference=human] [key=value ...] [--resume]
    rlpt train env.name=reward_model env.model_path=runs/rm algorithm.name=ppo
"""
from __future__ import annotations

import random
from collections.abc import Callable, Collection
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from rlpt.checkpoint import CheckpointError, load_weights, read_checkpoint_meta, resolve_checkpoint
from rlpt.config import ConfigError, JobConfig, LoopConfig, OptimConfig, RunConfig, Section, quote
from rlpt.envs.math_answer import MathAnswerEnv, verify_math
from rlpt.framework.critic import capture_hidden, output_projection
from rlpt.framework.environment import ArithmeticEnv, Prompt, Verdict, register_env
from rlpt.framework.trajectory import pad_sequences
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.model import GPT, GPTConfig, load_model
from rlpt.gpt_mini.task import ArithmeticTask, Problem, verify
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.loop import SupervisedLoop, open_run
from rlpt.preference.data import PreferencePair, collate_pairs, distinct_problems, load_pairs, sample_groups, save_pairs
from rlpt.run import Run

KIND = "reward_model"


# -- preferences: how a (hidden) labeller scores a response -------------------------------------------
def correct_score(response: str, gold: int) -> float:
    return verify(response, gold)


def is_concise(response: str) -> bool:
    """Just the answer (`12#`): no worked steps."""
    return "+" not in response and "=" not in response


def human_score(response: str, gold: int) -> float:
    """The RLHF demo's hidden taste: 2 = right and concise, 1 = right and verbose (CoT), 0 = wrong."""
    return 0.0 if not verify(response, gold) else (2.0 if is_concise(response) else 1.0)


PREFERENCES: dict[str, Callable[[str, int], float]] = {"correct": correct_score, "human": human_score}


@torch.no_grad()
def sample_ranked_pairs(policy, tok: CharTokenizer, problems: list[Problem], k: int, temperature: float,
                        max_tokens: int, score: Callable[[str, int], float], seed: int,
                        max_pairs_per_prompt: int = 4, batch: int = 512,
                        progress: bool = False) -> tuple[list[PreferencePair], dict]:
    """k samples per prompt, scored by `score`; pairs of distinct samples with different scores (higher ≻ lower)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    texts = sample_groups(policy, tok, [p.prompt for p in problems], k, sp, gen, batch, progress)
    pairs, flat = [], 0
    for j, p in enumerate(problems):
        scored = {t: score(t, p.gold) for t in texts[j * k:(j + 1) * k]}
        cands = [(a, b) for a in sorted(scored) for b in sorted(scored) if scored[a] > scored[b]]
        if not cands:
            flat += 1
            continue
        rng.shuffle(cands)
        pairs += [PreferencePair(p.prompt, a, b) for a, b in cands[:max_pairs_per_prompt]]
    scores = [score(t, problems[i // k].gold) for i, t in enumerate(texts)]
    return pairs, {"prompts": len(problems), "prompts_no_pair": flat, "pairs": len(pairs),
                   "sample_score_mean": sum(scores) / len(scores)}


# -- the model ----------------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """A trunk (gpt_mini, or a Hugging Face policy: `trunk_meta` = {"hf_path": ...}) and a scalar head."""

    def __init__(self, trunk: nn.Module, pad_id: int, trunk_meta: dict | None = None):
        super().__init__()
        self.trunk = trunk
        self.pad_id = pad_id
        self.trunk_meta = trunk_meta if trunk_meta is not None else trunk.cfg.to_dict()
        d = output_projection(trunk).in_features          # the final hidden state's width, whatever the trunk
        self.head = nn.Linear(d, 1)
        nn.init.zeros_(self.head.weight)   # every score starts at 0; no RNG consumed
        nn.init.zeros_(self.head.bias)

    @property
    def cfg(self):
        return self.trunk.cfg

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded -> scores (B,), read at each row's last non-pad token."""
        last = (ids != self.pad_id).sum(-1) - 1                                 # (B,)
        with capture_hidden(self.trunk) as store:
            self.trunk(ids)
        h = store[-1][torch.arange(ids.shape[0]), last]                        # (B, d)
        return self.head(h.float()).squeeze(-1)

    @torch.no_grad()
    def score_texts(self, tok: CharTokenizer, rows: list[tuple[list[int], str]]) -> list[float]:
        """[(prompt ids, response text)] -> scores, one padded forward."""
        prompts = [p for p, _ in rows]
        responses = [tok.encode(r)[: max(0, self.cfg.max_seq_len - len(p))] for p, r in rows]
        ids, _ = pad_sequences(prompts, responses, self.pad_id)                # (N, T)
        was = self.training
        self.eval()
        out = self(ids).tolist()
        self.train(was)
        return out

    def meta(self) -> dict:
        return {**self.trunk_meta, "kind": KIND}


def load_reward_model(path, tok: CharTokenizer | None = None) -> RewardModel:
    """A reward model from an `rlpt rm` checkpoint or run folder; a policy checkpoint is a clear error."""
    path = resolve_checkpoint(path)
    meta = dict(read_checkpoint_meta(path))
    if meta.pop("kind", None) != KIND:
        raise CheckpointError(f"checkpoint {str(path)!r} is a policy, not a reward model: train one with "
                              "`rlpt rm init_from=<SFT checkpoint>` and point env.model_path at its run folder")
    if "hf_path" in meta:   # a Hugging Face trunk: its architecture from that directory, every weight from here
        from rlpt.models.hf import load_hf_policy
        try:
            trunk = load_hf_policy(meta["hf_path"])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"reward model {str(path)!r} has a Hugging Face trunk whose architecture is read "
                                  f"from {meta['hf_path']!r}, which no longer loads ({e}): restore that directory"
                                  ) from None
    else:
        trunk = GPT(GPTConfig(**meta))
    rm = RewardModel(trunk, (tok or CharTokenizer()).pad_id, trunk_meta=meta)
    load_weights(path, rm)
    return rm.eval()


def bt_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """−mean log σ(r̂_w − r̂_l). Gradient weight σ(r̂_l − r̂_w): ordered pairs fade out (logistic regression)."""
    gap = r_w - r_l
    loss = -F.logsigmoid(gap).mean()
    return loss, {"loss/bt": loss.detach(), "rm/pair_acc": (gap > 0).float().mean(),
                  "rm/score_gap": gap.detach().mean()}


@torch.no_grad()
def pair_metrics(rm: RewardModel, pairs: list[PreferencePair], tok: CharTokenizer, batch: int = 256) -> dict:
    """Held-out pair accuracy (ties count half), mean gap r̂_w − r̂_l, and the mean chosen/rejected scores."""
    was = rm.training
    rm.eval()
    gaps, w_all, l_all = [], [], []
    for i in range(0, len(pairs), batch):
        b = collate_pairs(pairs[i:i + batch], tok)
        s = rm(b.ids)
        w_all.append(s[:b.n])
        l_all.append(s[b.n:])
        gaps.append(s[:b.n] - s[b.n:])
    rm.train(was)
    g, w, l_ = torch.cat(gaps), torch.cat(w_all), torch.cat(l_all)
    acc = ((g > 0).float() + 0.5 * (g == 0).float()).mean()
    return {"rm/pair_acc_heldout": acc.item(), "rm/score_gap_heldout": g.mean().item(),
            "rm/abs_gap_median_heldout": g.abs().median().item(),
            "rm/chosen_mean_heldout": w.mean().item(), "rm/rejected_mean_heldout": l_.mean().item()}


# -- the job -------------------------------------------------------------------------------------------------
class RMPairsConfig(Section):
    prompts: int = Field(512, ge=1, description="training prompts to sample from the SFT policy")
    heldout_prompts: int = Field(128, ge=1, description="held-out prompts for the pair-accuracy eval")
    k: int = Field(8, ge=2)
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(32, ge=1)
    preference: Literal["correct", "human"] = "correct"
    max_pairs_per_prompt: int = Field(4, ge=1)
    file: str | None = Field(None, description="JSONL training pairs instead of sampling")
    heldout_file: str | None = Field(None, description="JSONL held-out pairs (with file; else 10% of file)")

    @model_validator(mode="after")
    def _heldout_file_needs_file(self):
        if self.heldout_file is not None and self.file is None:   # sampled pairs bring their own held-out set
            raise ValueError("rm.pairs.heldout_file is only read with rm.pairs.file (the training pairs' file); "
                             "set rm.pairs.file too, or remove rm.pairs.heldout_file to sample both sets")
        return self


class RMConfig(LoopConfig):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1, description="pairs per step")
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=10, schedule="cosine")
    ckpt_every: int = Field(100, ge=1)
    pairs: RMPairsConfig = RMPairsConfig()
    eval_every: int = Field(50, ge=1)


class RMJob(JobConfig):
    run: RunConfig = RunConfig(name="rm")
    init_from: str | None = Field(None, description="the SFT checkpoint: samples the pairs and initialises the trunk")
    rm: RMConfig = RMConfig()


def rm_pairs(job: RMJob, policy, tok: CharTokenizer, run: Run, resume: bool,
             sample: Callable[[], tuple[list[PreferencePair], list[PreferencePair], dict]] | None = None):
    """(train pairs, held-out pairs, stats), saved in the run folder so a resume reuses them. `sample()` draws
    both sets in place of the arithmetic sampler (a prompt set: rlpt.text_stages)."""
    tr_path, ho_path = run.dir / "pairs.jsonl", run.dir / "pairs_heldout.jsonl"
    L = policy.cfg.max_seq_len
    if resume and tr_path.exists() and ho_path.exists():
        return load_pairs(tr_path, tok, L)[0], load_pairs(ho_path, tok, L)[0], {"source": "run folder (resume)"}
    pc = job.rm.pairs
    if pc.file:
        train, skips = load_pairs(pc.file, tok, L)
        if pc.heldout_file:
            held, _ = load_pairs(pc.heldout_file, tok, L)
        else:
            if len(train) < 2:
                raise ConfigError(f"rm.pairs.file {quote(pc.file)} holds {len(train)} usable pair (skipped: {skips}): "
                                  "the reward model needs at least 2, one to train on and one held out (10%); "
                                  "add pairs, or give the held-out pairs in rm.pairs.heldout_file")
            random.Random(job.run.seed).shuffle(train)
            n_ho = max(1, len(train) // 10)
            held, train = train[:n_ho], train[n_ho:]
        stats = {"source": pc.file, **{f"skipped_{k}": v for k, v in skips.items()}}
    elif sample is not None:
        train, held, stats = sample()
    else:
        task, score = ArithmeticTask(**job.task.model_dump()), PREFERENCES[pc.preference]
        seed, sampling = job.run.seed, (pc.k, pc.temperature, pc.max_tokens, score)
        train_problems = distinct_problems(task, random.Random(seed), pc.prompts, "train")
        held_problems = distinct_problems(task, random.Random(seed), pc.heldout_prompts, "heldout")
        train, stats = sample_ranked_pairs(policy, tok, train_problems, *sampling, seed, pc.max_pairs_per_prompt,
                                           progress=job.run.progress)
        held, _ = sample_ranked_pairs(policy, tok, held_problems, *sampling, seed + 1, pc.max_pairs_per_prompt,
                                      progress=job.run.progress)
        stats["source"] = f"sampled ({pc.preference})"
    if not train or not held:
        raise ConfigError(f"the reward model got {len(train)} training and {len(held)} held-out pairs: every "
                          "prompt's samples scored alike. Raise rm.pairs.k / rm.pairs.temperature or give "
                          "rm.pairs.file")
    save_pairs(tr_path, train)
    save_pairs(ho_path, held)
    return train, held, {**stats, "pairs_heldout": len(held)}


def train_rm(job: RMJob, resume: bool = False, allow_change: Collection[str] = (),
             policy: nn.Module | None = None, meta: dict | None = None, tok=None,
             sample: Callable[[], tuple[list[PreferencePair], list[PreferencePair], dict]] | None = None
             ) -> tuple[RewardModel, Run, dict]:
    """Train the RM as a run folder; returns (rm, run, final metrics). `policy` (with its checkpoint `meta`, e.g.
    {"hf_path": ...}) replaces the gpt_mini of init_from: a Hugging Face policy a recipe loaded (rlpt.recipe). On a
    prompt set (rlpt.text_stages) `tok` is the model's own tokenizer and `sample()` draws the pairs."""
    if not job.init_from:
        raise ConfigError("init_from is required for rlpt rm: set init_from=<an SFT checkpoint or run folder> "
                          "(it samples the pairs and initialises the RM's trunk)")
    tok, cfg = tok or CharTokenizer(), job.rm
    run, ckpt = open_run(job, resume, allow_change)
    try:
        if policy is None:
            policy = load_model(job.init_from, job.model, tok)
        train, held, stats = rm_pairs(job, policy, tok, run, resume=ckpt is not None, sample=sample)
    except BaseException:
        run.abandon()   # a failed start leaves no new run folder behind
        raise
    print(f"[rlpt] reward model: {len(train)} training pairs, {len(held)} held-out ({stats['source']})")
    rm = RewardModel(policy, tok.pad_id, meta)   # the policy's weights become the trunk (nothing else uses them)

    def loss_fn(rng: random.Random) -> tuple[torch.Tensor, dict]:
        idx = rng.sample(range(len(train)), min(cfg.batch_size, len(train)))
        b = collate_pairs([train[i] for i in idx], tok)
        s = rm(b.ids)                                                        # (2B,)
        return bt_loss(s[:b.n], s[b.n:])

    def final_fn() -> dict:
        calibrate(rm, held, tok)
        final = pair_metrics(rm, held, tok)
        loop.save(cfg.steps)                    # the calibrated offset is part of the final checkpoint
        run.log(cfg.steps, {"rm/offset": rm.head.bias.item()})
        return {**final, "pairs/train": len(train), "pairs/heldout": len(held)}

    loop = SupervisedLoop(run, ckpt, rm, cfg, job.run.seed, meta=rm.meta())
    if loop.start == 0:
        run.log(0, pair_metrics(rm, held, tok))
    final = loop.fit(loss_fn, lambda: pair_metrics(rm, held, tok), cfg.eval_every, final_fn, job.run.progress,
                     desc="rm", show=("loss/bt", "rm/pair_acc_heldout"))
    return rm, run, final


@torch.no_grad()
def calibrate(rm: RewardModel, held: list[PreferencePair], tok: CharTokenizer) -> None:
    """Pin BT's free offset: 0 halfway between the mean held-out chosen and rejected scores."""
    m = pair_metrics(rm, held, tok)
    rm.head.bias -= 0.5 * (m["rm/chosen_mean_heldout"] + m["rm/rejected_mean_heldout"])


# -- the envs ------------------------------------------------------------------------------------------------
def frozen_reward_model(name: str, reward_model: RewardModel | None, model_path: str | None, tok) -> RewardModel:
    """An RM env's reward model: the one given, else loaded from env.model_path; frozen (eval, no grad) during RL,
    where the RM is an amortised human, not a learner."""
    if reward_model is None:
        if model_path is None:
            raise ConfigError(f"env '{name}' needs a trained reward model: set env.model_path=<an rlpt rm run folder "
                              "or checkpoint> (train one with `rlpt rm init_from=<SFT checkpoint>`)")
        reward_model = load_reward_model(model_path, tok)
    for p in reward_model.parameters():
        p.requires_grad_(False)
    return reward_model.eval()


@register_env("reward_model")
class RewardModelEnv(ArithmeticEnv):
    """Arithmetic prompts, rewarded by a reward model's score; the gold verdict rides along in info."""
    model_path_arg = "model_path"     # rlpt.train passes env.model_path here

    def __init__(self, task=None, seed: int = 0, tokenizer=None, reward_model: RewardModel | None = None,
                 model_path: str | None = None):
        super().__init__(task, seed, tokenizer)
        self.rm = frozen_reward_model("reward_model", reward_model, model_path, self.tokenizer)

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        score = self.rm.score_texts(self.tokenizer, [(prompt.ids, response)])[0]
        return Verdict(score, {"correct": verify(response, prompt.gold) == 1.0,
                               "human_score": human_score(response, prompt.gold)})


@register_env("math_reward_model")
class MathRewardModelEnv(MathAnswerEnv):
    """The math env's prompts (a prompt set: data.prompts), rewarded by a reward model's score in the model's own
    tokenizer; the math verifier's verdict rides along in info["correct"] (what over-optimisation is read against)."""
    model_path_arg = "model_path"

    def __init__(self, reward_model: RewardModel | None = None, model_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rm = frozen_reward_model("math_reward_model", reward_model, model_path, self.tokenizer)

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        score = self.rm.score_texts(self.tokenizer, [(prompt.ids, response)])[0]
        return Verdict(score, {"correct": verify_math(response, str(prompt.gold))[0] == 1.0})
