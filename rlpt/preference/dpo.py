"""DPO and family: learn from preference pairs without a reward model or rollouts (lesson 16).

    Δ = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]      log π(y) = Σ_t over response tokens
    DPO    −log σ(β Δ)                                     Rafailov et al. 2023
    IPO    (Δ − 1/(2β))²        (Δ unscaled)               Azar et al. 2023
    KTO    E[λ_y − v(y)],  v = λ_D σ(β(r − z0)) | λ_U σ(β(z0 − r)),  r = log π_θ/π_ref,  z0 = max(0, KL̂) detached
                                                           Ethayarajh et al. 2024
    ORPO   −mean_t log π(y_w) + λ · −log σ(log odds(y_w) − log odds(y_l)),  odds = P/(1−P),  P = exp(mean_t log π)
                                                           Hong et al. 2024 (no reference)
    SimPO  −log σ((β/|y_w|) log π(y_w) − (β/|y_l|) log π(y_l) − γ)   Meng et al. 2024 (no reference)

Why it works: the KL-regularised RL optimum is π* ∝ π_ref·exp(r/β), so r = β log π*/π_ref + β log Z(x);
put that into Bradley–Terry and Z(x) cancels between two responses to the same prompt (Rafailov et al.
2023 §4). `β·log π_θ/π_ref` is the *implicit reward*; its chosen-minus-rejected gap (`reward/margin`) and
how often it is positive (`reward/accuracy`) are the numbers to watch, next to the absolute
`logp/chosen`, which usually falls too (lesson 16: DPO pushes the pair apart, mostly by pushing y_l down).

The reference is a frozen deep copy of the starting policy (eval mode, requires_grad False, not
in the optimizer); SimPO and ORPO need none, so none is built. Since both the pairs and the
reference are fixed, log π_ref of every pair is computed once at the start (`precompute_reference`):
a DPO step then costs what a SimPO step costs (bench/dpo_step.py). Pairs are sampled once from the
starting policy (rlpt.preference.data) and saved as `pairs.jsonl` in the run folder, so a resume
trains on the same data. With `dpo.packing` the 2B rows of [chosen; rejected] run as one packed forward
(rlpt.framework.trajectory.pack_batch: gpt_mini's varlen layout, rlpt.framework.varlen, or pack_rows' bins,
each pair's prompt stored once), so no FLOP goes to padding; the loss equals the padded forward's to fp32 rounding.
`dpo.nll_weight` > 0 adds α·NLL(y_w) per token (RPO; Pang et al. 2024's
fix for reasoning tasks, where pure DPO can lower the chosen answers' likelihood).

    rlpt dpo recipes/dpo_arith.yaml init_from=runs/sft_cot [dpo.method=ipo] [key=value ...] [--resume]
"""
from __future__ import annotations

import copy
import random
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from rlpt.config import ConfigError, EvalConfig, JobConfig, LoopConfig, OptimConfig, RunConfig, Section
from rlpt.framework.environment import ArithmeticEnv
from rlpt.framework.evaluate import evaluate
from rlpt.framework.trajectory import pack_batch, per_token_logp, supports_packing
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.task import make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.loop import SupervisedLoop, open_run
from rlpt.preference.data import (
    PairBatch,
    PreferencePair,
    collate_pairs,
    collate_responses,
    load_pairs,
    sample_pairs,
    save_pairs,
)
from rlpt.run import Run

Method = Literal["dpo", "ipo", "kto", "orpo", "simpo"]
NEEDS_REFERENCE = {"dpo": True, "ipo": True, "kto": True, "orpo": False, "simpo": False}
# β per method when dpo.beta is unset. IPO and KTO: their papers' 0.1. SimPO: a length-normalised
# margin scale, so larger (paper: 2–10). ORPO uses no β (its weight is dpo.lam). DPO: 0.5, not the
# paper's 0.1: on this task's pairs (answers that differ in a digit or two) β = 0.1 keeps the gradient
# weight σ(−βΔ) near ½ until Δ ≈ 20 nats, pushes every digit down and *lowered* held-out accuracy of a
# 0.935 CoT start to 0.86–0.89 (lr 1e-5..2e-5, 100 steps); β = 0.5 saturates by Δ ≈ 5 and raised it
# (docs/lessons.md, lesson 16 row; the lesson's own widget default is 0.5 too).
DEFAULT_BETA = {"dpo": 0.5, "ipo": 0.1, "kto": 0.1, "orpo": 0.0, "simpo": 2.0}


# -- sequence log-probs ----------------------------------------------------------------------------
def sequence_logp(model, ids: torch.Tensor, mask: torch.Tensor,
                  packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (Σ_t mask·log π(token), |y|) per row, both (N,). Only response tokens count: a prompt token is
    context, not the policy's choice. `packing`: one packed forward of the N rows (a model that takes segment
    ids; else the padded one)."""
    packed = None
    if packing and supports_packing(model):   # chosen and rejected share one copy of their prompt
        prompt_len = (mask > 0).float().argmax(-1) + 1                  # response token 0 sits at column P-1
        packed = pack_batch(model, ids, mask, prompt_len)              # varlen for gpt_mini, else bins
    logp = per_token_logp(model, ids, packed=packed)        # (N, T-1)
    return (logp * mask).sum(-1), mask.sum(-1)


# -- the losses: pure functions of per-sequence log-probs, each -> (loss, metrics) -------------------
def _pair_metrics(r_c: torch.Tensor, r_r: torch.Tensor, p_c: torch.Tensor, p_r: torch.Tensor) -> dict:
    r_c, r_r = r_c.detach(), r_r.detach()
    return {"reward/chosen": r_c.mean(), "reward/rejected": r_r.mean(), "reward/margin": (r_c - r_r).mean(),
            "reward/accuracy": (r_c > r_r).float().mean(),
            "logp/chosen": p_c.detach().mean(), "logp/rejected": p_r.detach().mean()}


def dpo_loss(pc, pr, rc, rr, beta: float):
    """−log σ(βΔ). Its gradient weight σ(−βΔ) fades once a pair is ordered, but never reaches zero:
    with a repeated, deterministic preference Δ grows without bound (IPO's motivation)."""
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)           # implicit rewards β log π/π_ref
    loss = -F.logsigmoid(r_c - r_r).mean()
    return loss, _pair_metrics(r_c, r_r, pc, pr)


def ipo_loss(pc, pr, rc, rr, beta: float):
    """(Δ − 1/(2β))² with Δ unscaled: a regression to a finite target, so the pair stops separating there."""
    delta = (pc - rc) - (pr - rr)
    loss = ((delta - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _pair_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)


def kto_loss(pc, pr, rc, rr, kl_p, kl_r, beta: float, lam_d: float = 1.0, lam_u: float = 1.0):
    """KTO on pairs read as single labels: y_w desirable, y_l undesirable.

    z0 = max(0, mean(log π_θ(y'|x) − log π_ref(y'|x))) over mismatched (x, y') pairs, detached: the
    reference point a response is judged against (the policy's current KL, Ethayarajh et al. 2024 §4).
    """
    z0 = (kl_p - kl_r).mean().clamp(min=0).detach()
    r_c, r_r = pc - rc, pr - rr
    v_d = lam_d * torch.sigmoid(beta * (r_c - z0))
    v_u = lam_u * torch.sigmoid(beta * (z0 - r_r))
    loss = torch.cat([lam_d - v_d, lam_u - v_u]).mean()
    return loss, {**_pair_metrics(beta * r_c, beta * r_r, pc, pr), "kto/z0": z0}


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(P/(1−P)) for P = exp(avg_logp) < 1, computed stably: avg − log(1 − e^avg)."""
    return avg_logp - torch.log1p(-torch.exp(avg_logp).clamp(max=1 - 1e-7))


def orpo_loss(pc, pr, len_c, len_r, lam: float):
    """NLL(y_w) (mean over its tokens) + λ·(−log σ(log odds(y_w) − log odds(y_l))); P length-normalised."""
    avg_c, avg_r = pc / len_c.clamp(min=1), pr / len_r.clamp(min=1)
    lo_c, lo_r = log_odds(avg_c), log_odds(avg_r)
    nll = -avg_c.mean()
    ratio = -F.logsigmoid(lo_c - lo_r).mean()
    loss = nll + lam * ratio
    return loss, {**_pair_metrics(lo_c, lo_r, pc, pr), "loss/nll": nll.detach(), "loss/odds_ratio": ratio.detach()}


def simpo_loss(pc, pr, len_c, len_r, beta: float, gamma: float):
    """−log σ(β·avg log π(y_w) − β·avg log π(y_l) − γ): the reward is the length-normalised log-prob
    (what generation ranks by), γ a target margin; no reference model at all."""
    r_c, r_r = beta * pc / len_c.clamp(min=1), beta * pr / len_r.clamp(min=1)
    loss = -F.logsigmoid(r_c - r_r - gamma).mean()
    return loss, _pair_metrics(r_c, r_r, pc, pr)


# -- config ------------------------------------------------------------------------------------------
class PairsConfig(Section):
    prompts: int = Field(1024, ge=1, description="distinct training prompts to sample from")
    k: int = Field(8, ge=2, description="samples per prompt")
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(32, ge=1)
    format: Literal["cot", "direct"] | None = Field(
        "cot", description="the policy's answer format: its canonical response is the preferred correct one")
    max_pairs_per_prompt: int = Field(4, ge=1)
    rejected: Literal["first_error", "full"] = Field(
        "first_error", description="cut a wrong response after its first wrong step (see data.cut_at_first_error)")
    file: str | None = Field(None, description="a JSONL file of pairs to use instead of sampling")


class DPOConfig(LoopConfig):
    method: Method = "dpo"
    beta: float | None = Field(None, gt=0, description="None = the method's default (DEFAULT_BETA)")
    gamma: float = Field(1.0, ge=0, description="SimPO target margin γ")
    lam: float = Field(0.1, ge=0, description="ORPO weight λ of the odds-ratio term")
    lam_d: float = Field(1.0, gt=0, description="KTO weight of desirable responses")
    lam_u: float = Field(1.0, gt=0, description="KTO weight of undesirable responses")
    nll_weight: float = Field(0.0, ge=0, description="α of an extra per-token NLL on y_w (RPO); 0 = off")
    # on by default: 1.6-1.7x the padded step at 64 pairs (bench/dpo_step.py), the same loss to fp32 rounding
    packing: bool = Field(True, description="one packed forward of [chosen; rejected], sharing their prompt "
                          "(no FLOP on padding or on a second copy of the prompt)")
    # 100: held-out accuracy peaked around step 50-100 and slid back by 200 (the pairs are few and
    # fixed, so later steps mostly overfit them: offline DPO's limit, lesson 16)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1, description="pairs per step")
    # 1e-5: Adam moves every weight ~lr per step whatever the gradient's size, and this 0.8 M-parameter
    # policy's SFT weights are ~0.02-0.1; 5e-5 for 150 steps took a 0.935 start to 0.68.
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=10, schedule="cosine")
    log_every: int = Field(5, ge=1)
    ckpt_every: int = Field(50, ge=1)
    pairs: PairsConfig = PairsConfig()

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.method]


class DPOJob(JobConfig):
    run: RunConfig = RunConfig(name="dpo")
    init_from: str | None = Field(None, description="the SFT checkpoint (or run folder) to start from: required")
    dpo: DPOConfig = DPOConfig()
    eval: EvalConfig = EvalConfig(every=50, size=400)


# -- reference, loss dispatch, one step ---------------------------------------------------------------
def make_reference(policy: torch.nn.Module, method: str) -> torch.nn.Module | None:
    """A frozen deep copy for the methods that need π_ref; None (not even allocated) for SimPO / ORPO."""
    if not NEEDS_REFERENCE[method]:
        return None
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def mismatched(batch: PairBatch) -> list[tuple[list[int], list[int]]]:
    """KTO's KL rows: prompt i with the chosen response of pair i+1 (mod B), as (prompt ids, response ids)."""
    rows = []
    for i in range(batch.n):
        j = (i + 1) % batch.n
        p_len = int(batch.mask[i].nonzero()[0]) + 1          # response token 0 sits at column P-1
        cols = batch.mask[j].nonzero().squeeze(-1)
        rows.append((batch.ids[i, :p_len].tolist(), batch.ids[j, cols + 1].tolist()))
    return rows


def preference_loss(cfg: DPOConfig, policy, reference, batch: PairBatch, pad_id: int,
                    ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One forward of [chosen; rejected] through the policy -> (loss, metrics). The reference's
    log-probs are `ref_logp` (2B,) when precomputed, else one no-grad forward of the frozen reference."""
    B, beta = batch.n, cfg.beta_value
    logp, lens = sequence_logp(policy, batch.ids, batch.mask, cfg.packing)          # (2B,)
    pc, pr, len_c, len_r = logp[:B], logp[B:], lens[:B], lens[B:]
    ref_c = ref_r = None
    if reference is not None:
        if ref_logp is None:
            with torch.no_grad():
                ref_logp, _ = sequence_logp(reference, batch.ids, batch.mask, cfg.packing)
        ref_c, ref_r = ref_logp[:B], ref_logp[B:]
    m = cfg.method
    if m == "dpo":
        loss, metrics = dpo_loss(pc, pr, ref_c, ref_r, beta)
    elif m == "ipo":
        loss, metrics = ipo_loss(pc, pr, ref_c, ref_r, beta)
    elif m == "kto":
        kl_batch = collate_responses(mismatched(batch), pad_id)
        with torch.no_grad():   # z0 is detached: no graph needed for the KL estimate
            kl_p, _ = sequence_logp(policy, kl_batch.ids, kl_batch.mask, cfg.packing)
            kl_r, _ = sequence_logp(reference, kl_batch.ids, kl_batch.mask, cfg.packing)
        loss, metrics = kto_loss(pc, pr, ref_c, ref_r, kl_p, kl_r, beta, cfg.lam_d, cfg.lam_u)
    elif m == "orpo":
        loss, metrics = orpo_loss(pc, pr, len_c, len_r, cfg.lam)
    else:
        loss, metrics = simpo_loss(pc, pr, len_c, len_r, beta, cfg.gamma)
    metrics[f"loss/{m}"] = loss.detach()
    if cfg.nll_weight > 0:
        nll = -(pc / len_c.clamp(min=1)).mean()
        loss = loss + cfg.nll_weight * nll
        metrics["loss/nll_chosen"] = nll.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


@torch.no_grad()
def precompute_reference(reference, pairs: list[PreferencePair], tok: CharTokenizer, batch: int = 256,
                         packing: bool = False) -> torch.Tensor:
    """log π_ref(chosen), log π_ref(rejected) of every pair -> (N, 2), once: the pairs and the reference
    are both fixed, so a reference forward per step would recompute the same numbers (TRL's
    `precompute_ref_log_probs`). Only KTO still runs the reference per step, on its mismatched pairs."""
    out = []
    for i in range(0, len(pairs), batch):
        b = collate_pairs(pairs[i:i + batch], tok)
        logp, _ = sequence_logp(reference, b.ids, b.mask, packing)
        out.append(torch.stack([logp[:b.n], logp[b.n:]], 1))
    return torch.cat(out)


# -- the job --------------------------------------------------------------------------------------------
def prepare_pairs(job: DPOJob, policy, tok: CharTokenizer, run: Run, resume: bool,
                  sample: Callable[[], tuple[list[PreferencePair], dict]] | None = None
                  ) -> tuple[list[PreferencePair], dict]:
    """Pairs for this run: the run folder's pairs.jsonl on resume, else the file, else sampled now (by `sample()`
    when given, else from the arithmetic task)."""
    saved = run.dir / "pairs.jsonl"
    pc = job.dpo.pairs
    if resume and saved.exists():
        pairs, skips = load_pairs(saved, tok, policy.cfg.max_seq_len)
        return pairs, {"pairs": len(pairs), "source": "run folder (resume)"}
    if pc.file:
        pairs, skips = load_pairs(pc.file, tok, policy.cfg.max_seq_len)
        if Path(pc.file).resolve() != saved.resolve():
            shutil.copyfile(pc.file, saved)
        return pairs, {"pairs": len(pairs), "skipped_identical": skips["identical"],
                       "skipped_too_long": skips["too_long"], "source": pc.file}
    if sample is not None:
        pairs, stats = sample()
    else:
        pairs, stats = sample_pairs(policy, tok, make_task(job.task), pc.prompts, pc.k, pc.temperature,
                                    pc.max_tokens, seed=job.run.seed, fmt=pc.format,
                                    max_pairs_per_prompt=pc.max_pairs_per_prompt, rejected=pc.rejected,
                                    progress=job.run.progress)
    if not pairs:
        raise ConfigError(f"sampling gave no preference pair ({stats}): every prompt's {pc.k} samples were all "
                          "right or all wrong. Raise dpo.pairs.k or dpo.pairs.temperature, or start from a "
                          "less (or more) accurate checkpoint")
    save_pairs(saved, pairs)
    return pairs, {**stats, "source": "sampled"}


def run_dpo(job: DPOJob, resume: bool = False, allow_change: Collection[str] = (),
            policy: torch.nn.Module | None = None, meta: dict | None = None, tok=None, env=None,
            sample: Callable[[], tuple[list[PreferencePair], dict]] | None = None) -> tuple[torch.nn.Module, Run, dict]:
    """The DPO-family job as a run folder; returns (model, run, final metrics). `policy` (with the checkpoints'
    `meta`) replaces the gpt_mini of init_from: a Hugging Face policy a recipe loaded (rlpt.recipe); its reference
    is its own frozen copy. On a prompt set in the model's own tokenizer (rlpt.text_stages) `tok` and `env` replace
    CharTokenizer and the arithmetic env, and `sample()` draws the pairs in place of the arithmetic sampler."""
    if not job.init_from:
        raise ConfigError("init_from is required for rlpt dpo: set init_from=<an SFT checkpoint or run folder>, "
                          "e.g. init_from=runs/sft (DPO refines a policy; its reference is that policy)")
    if job.dpo.beta is None and job.dpo.method != "orpo":   # config.yaml records the β that trained (ORPO has none)
        job = job.model_copy(update={"dpo": job.dpo.model_copy(update={"beta": job.dpo.beta_value})})
    tok, task, cfg = tok or CharTokenizer(), make_task(job.task), job.dpo
    run, ckpt = open_run(job, resume, allow_change)
    try:
        if policy is None:
            policy = load_model(job.init_from, job.model, tok)
        reference = make_reference(policy, cfg.method)          # from init_from, before any resume
        env = env if env is not None else ArithmeticEnv(task, tokenizer=tok)
        heldout = env.heldout(job.eval.size)
        pairs, pair_stats = prepare_pairs(job, policy, tok, run, resume=ckpt is not None, sample=sample)
    except BaseException:
        run.abandon()   # a failed start leaves no new run folder behind
        raise
    print(f"[rlpt] {len(pairs)} preference pairs ({pair_stats.get('source')}): "
          + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in pair_stats.items()
                      if k != "source"))
    ref_table = None if reference is None else \
        precompute_reference(reference, pairs, tok, packing=cfg.packing)       # (N, 2)

    def loss_fn(rng: random.Random) -> tuple[torch.Tensor, dict]:
        chosen = rng.sample(range(len(pairs)), min(cfg.batch_size, len(pairs)))
        batch = collate_pairs([pairs[i] for i in chosen], tok)
        ref = torch.cat([ref_table[chosen, 0], ref_table[chosen, 1]]) if ref_table is not None else None   # (2B,)
        return preference_loss(cfg, policy, reference, batch, tok.pad_id, ref)

    def eval_fn() -> dict:
        ev = evaluate(policy, env, heldout, job.eval.max_tokens)
        return {"acc/heldout": ev["acc"], "response/len_mean": ev["len"]}

    def final_fn() -> dict:
        rows = run.read_metrics()
        acc = [r["acc/heldout"] for r in rows if "acc/heldout" in r]
        last = [r for r in rows if "reward/margin" in r][-1:]
        final = {"acc/heldout_start": acc[0], "acc/heldout_final": acc[-1], "pairs": len(pairs)}
        for k in ("reward/margin", "reward/accuracy", "logp/chosen", "logp/rejected", "loss"):
            if last and k in last[0]:
                final[k] = last[0][k]
        return final

    loop = SupervisedLoop(run, ckpt, policy, cfg, job.run.seed, meta=meta)
    if loop.start == 0:
        run.log(0, {**eval_fn(), **{f"pairs/{k}": v for k, v in pair_stats.items() if not isinstance(v, str)}})
    final = loop.fit(loss_fn, eval_fn, job.eval.every, final_fn, job.run.progress, desc=cfg.method,
                     show=("loss", "reward/accuracy", "acc/heldout"))
    return policy, run, final
