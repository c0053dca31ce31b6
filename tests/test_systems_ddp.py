"""Data-parallel trainer workers (rlpt.systems.ddp): W ranks, each training its share of every mini-batch with the
global batch's denominators and the gradients summed, take the single trainer's step.

The fast tests run the real gloo group in threads of this process (a TCPStore on a free port, no Ray); the slow
one runs two trainer actors on a local Ray against the in-process Controller.
"""
from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers grpo
from rlpt.framework.algorithm import make_algorithm
from rlpt.framework.trainer import Trainer
from rlpt.framework.trajectory import Trajectory, collate, per_token_logp
from rlpt.systems.ddp import DDPTrainer, RankGroup, data_parallel, open_store, shard, shard_rows

from conftest import TOK, tiny_gpt

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def grpo_batch(model, n_groups: int = 3, k: int = 3, seed: int = 0):
    """n_groups × k trajectories of unequal lengths (2-9 tokens), GRPO advantages, old_logp from `model`."""
    g = torch.Generator().manual_seed(seed)
    algo = make_algorithm({"name": "grpo", "beta": 0.05}, group_size=k, max_tokens=10)
    groups = []
    for b in range(n_groups):
        prompt = torch.randint(3, TOK.vocab_size, (4,), generator=g).tolist()
        group = []
        for _ in range(k):
            R = int(torch.randint(2, 10, (1,), generator=g))
            resp = torch.randint(3, TOK.vocab_size, (R,), generator=g).tolist()
            with torch.no_grad():
                lp = per_token_logp(model, torch.tensor([prompt + resp]))[0, len(prompt) - 1:]
            t = Trajectory(prompt, resp, torch.ones(R), lp.clone(), reward=float(torch.rand((), generator=g) > 0.5),
                           group=b)
            t.ref_logp = lp + 0.01 * torch.randn(R, generator=g)
            group.append(t)
        groups.append(group)
    groups[0][0].reward, groups[0][1].reward = 1.0, 0.0       # at least one mixed group
    algo.compute_advantages(groups)
    return collate([t for grp in groups for t in grp if not t.degenerate], TOK.pad_id), algo


def grads_of(model, batch, algo) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = algo.compute_loss(batch, per_token_logp(model, batch.input_ids))
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_shard_rows_cover_the_batch_once():
    assert [shard_rows(5, r, 2).tolist() for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [shard_rows(2, r, 3).tolist() for r in range(3)] == [[0], [1], []]    # a rank may get nothing


@pytest.mark.parametrize("mode", MODES)
def test_global_denominators_make_rank_gradients_add_up(mode):
    """Σ_r ∇L(share_r) = ∇L(global batch) when each share keeps the global denominators; normalising each share
    by its own tokens / rows and averaging over ranks (DDP's default) gives another gradient."""
    model = tiny_gpt()
    batch, algo = grpo_batch(model)
    algo.cfg.loss_agg = mode
    full = grads_of(model, batch, algo)
    W = 2
    shares = [shard(batch, r, W) for r in range(W)]
    assert all(s.agg_tokens == batch.agg_tokens and s.agg_seqs == batch.agg_seqs for s in shares)
    summed = [sum(gs) for gs in zip(*(grads_of(model, s, algo) for s in shares))]
    assert max((a - b).abs().max().item() for a, b in zip(full, summed)) <= 1e-6
    own = [batch.select(shard_rows(batch.size, r, W), renormalize=True) for r in range(W)]
    assert own[0].agg_tokens != own[1].agg_tokens                  # unequal shares: where the two rules part
    mean_of_means = [sum(gs) / W for gs in zip(*(grads_of(model, s, algo) for s in own))]
    assert max((a - b).abs().max().item() for a, b in zip(full, mean_of_means)) > 1e-4


def _ranks_in_threads(world: int, make_trainer, run) -> list:
    """Start `world` ranks of one gloo group in threads (a TCPStore on a free port) and run `run(trainer)` on
    each; -> each rank's result."""
    store = open_store("127.0.0.1")
    out, errors = [None] * world, []

    threads_per_rank = torch.get_num_threads()

    def rank(r: int) -> None:
        torch.set_num_threads(threads_per_rank)   # OpenMP's count is per thread: a new one would take every core
        try:
            group = RankGroup("127.0.0.1", store.port, r, world, store=store if r == 0 else None)
            out[r] = run(data_parallel(make_trainer(), group))
        except Exception as e:   # surfaced below: an assertion in a thread would be lost
            errors.append(e)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("world,micro", [(2, 0), (3, 2)])
def test_ranks_over_gloo_take_the_single_trainers_steps(world, micro):
    """3 train steps (2 mini-batches each, so the second sees a moved policy and ratios ≠ 1) on one global batch
    of 9 rows: W ranks over a real gloo group end with the single trainer's parameters (≤ 1e-6) and report its
    metrics. W = 3 with micro-batches of 2 rows: ranks hold 2, 2 and 1 rows (1, 1 and 1 backward passes per
    mini-batch of 5, fewer for the one of 4), which torch's DDP wrapper could not run.

    lr 1e-3 (TINY_RL's): AdamW divides by √v, so a gradient's fp32 rounding (summed in another order: ~1e-7
    relative) moves a step by ~1e-4·lr; at lr 1e-2 the parameters part by ~4e-6 after 3 steps, and so does the
    single trainer against itself with micro-batches of 1 or 2 rows (same math, other order; measured here)."""
    base = tiny_gpt(seed=1)
    batch, algo = grpo_batch(base, seed=3)
    assert batch.size == 9

    def make_trainer(model=None):
        model = model or copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        return Trainer(model, opt, None, 1.0, micro, mini_batches=2, epochs=1, seed=5)

    def run(trainer):
        metrics = [trainer.train_step(batch, algo.compute_loss) for _ in range(3)]
        return metrics, [p.detach().clone() for p in trainer.model.parameters()]

    single_m, single_p = run(make_trainer())
    results = _ranks_in_threads(world, make_trainer, run)
    for ranks_m, ranks_p in results:
        assert max((a - b).abs().max().item() for a, b in zip(single_p, ranks_p)) <= 1e-6
        for a, b in zip(single_m, ranks_m):
            assert a.keys() == b.keys()
            for k in ("loss", "loss/pg", "loss/kl", "grad/norm", "clip/frac", "kl/mean", "policy/entropy",
                      "staleness/mean", "staleness/max", "ratio/p50", "ratio/max", "check/logp_mismatch"):
                if k not in a:      # the log-prob check runs on the first step only (weights as sampled)
                    continue
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
            assert a["ratio/hist"] == b["ratio/hist"]
        assert "check/logp_mismatch" in ranks_m[0]
    moved = max((p - q).abs().max().item() for p, q in zip(single_p, base.parameters()))
    assert moved > 1e-3                                             # the comparison covers real updates


def test_a_rank_with_no_rows_still_joins_the_sum():
    """A mini-batch of 1 row over 2 ranks: rank 1 trains nothing, contributes zero gradient, steps the same."""
    base = tiny_gpt(seed=2)
    batch, algo = grpo_batch(base, n_groups=1, k=2, seed=4)
    one = batch.select(torch.tensor([0]), renormalize=True)

    def make_trainer():
        model = copy.deepcopy(base)
        return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), None, 1.0, 0, 1, 1)

    def run(trainer):
        m = trainer.train_step(one, algo.compute_loss)
        return m, [p.detach().clone() for p in trainer.model.parameters()]

    single_m, single_p = run(make_trainer())
    for m, ps in _ranks_in_threads(2, make_trainer, run):
        assert max((a - b).abs().max().item() for a, b in zip(single_p, ps)) <= 1e-6
        assert abs(m["loss"] - single_m["loss"]) <= 1e-6


def test_data_parallel_keeps_the_trainer_and_broadcasts_rank0s_weights():
    """data_parallel shares the trainer's model and optimizer (no copy) and overwrites a rank's weights with
    rank 0's, as DDP does when it wraps a model."""
    models = [tiny_gpt(seed=0), tiny_gpt(seed=9)]
    trainers = [Trainer(m, torch.optim.AdamW(m.parameters()), None) for m in models]
    it = iter(trainers)
    out = _ranks_in_threads(2, lambda: next(it), lambda t: t)
    assert all(isinstance(t, DDPTrainer) for t in out)
    # the ranks' threads take the trainers in whichever order they start: rank 1 holds one of the two, uncopied
    k = next(i for i in range(2) if out[1].model is models[i])
    assert out[1].opt is trainers[k].opt and out[0].model is models[1 - k]
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_sharded_reference_scores_a_share_and_gathers_the_rest():
    """Two ranks each score half of 9 trajectories (π_ref and a scorer) and end with all 9 scored, equal to one
    Reference's scores to fp32 rounding."""
    from rlpt.framework.reference import Reference
    from rlpt.systems.ddp import ShardedReference
    policy = tiny_gpt(seed=1)
    single = _trajs(policy)
    one = Reference(policy, scorers={"prox_logp": Reference.prox_scorer(policy, 1.0)})
    one.score(single, TOK.pad_id)
    scored: list = []

    class Counting(Reference):
        def score(self, trajs, pad_id):
            scored.append(len(trajs))
            super().score(trajs, pad_id)

    store = open_store("127.0.0.1")
    out = [None, None]

    def rank(r):
        torch.set_num_threads(1)
        group = RankGroup("127.0.0.1", store.port, r, 2, store=store if r == 0 else None)
        trajs = _trajs(policy)
        ref = ShardedReference(Counting(policy, scorers={"prox_logp": Reference.prox_scorer(policy, 1.0)}), group)
        ref.score(trajs, TOK.pad_id)
        out[r] = trajs
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(scored) == [4, 5]                                   # each rank scored its share only
    for trajs in out:
        for a, b in zip(single, trajs):
            assert torch.allclose(a.ref_logp, b.ref_logp, atol=1e-6)
            assert torch.allclose(a.extra["prox_logp"], b.extra["prox_logp"], atol=1e-6)


def _trajs(policy) -> list:
    """9 trajectories of unequal lengths, unscored (fresh objects each call)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(9):
        prompt = torch.randint(3, TOK.vocab_size, (4,), generator=g).tolist()
        R = int(torch.randint(2, 10, (1,), generator=g))
        resp = torch.randint(3, TOK.vocab_size, (R,), generator=g).tolist()
        out.append(Trajectory(prompt, resp, torch.ones(R), torch.zeros(R)))
    return out


def test_trainer_workers_needs_a_ray_topology():
    from rlpt.systems.config import SystemConfig
    with pytest.raises(ValueError, match="system.trainer_workers=2 places trainer actors on Ray"):
        SystemConfig(trainer_workers=2)
    with pytest.raises(ValueError, match="partial_rollouts=true"):
        SystemConfig(topology="disaggregated", partial_rollouts=True)
    assert SystemConfig(topology="disaggregated", trainer_workers=2).trainer_workers == 2


# -- on Ray ------------------------------------------------------------------------------------------------------
ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_two_trainer_workers_on_ray_equal_the_single_trainer(tmp_path):
    """system.trainer_workers=2 (disaggregated, one rollout worker, 2 mini-batches): 3 GRPO steps give the
    in-process Controller's parameters (≤ 1e-6) and metrics, and both ranks hold the same weights. A random tiny
    policy rewarded for an even response length (every group mixed, every step trains; no SFT start needed).

    lr 1e-4: AdamW turns the fp32 rounding of a summed gradient (another order than one process's) into a
    parameter gap that grows with lr. At TINY_RL's lr 1e-3 this run's two ranks part from the single trainer by
    3.27e-6 after 3 steps, and so does the single trainer from itself with trainer.micro_batch_size=4 (3.27e-6;
    7 rows: 2.86e-6): the same math in another order, not a data-parallel error. At 1e-4: 3.3e-7 with bin packing;
    with varlen packing (each rank's rows flattened into other GEMM shapes) 1.045e-6, and the single trainer against
    itself with trainer.micro_batch_size=4 parts by exactly that, 1.045e-6 (7 rows: 5.6e-7; AMD EPYC). Bound 2e-6: a
    wrong denominator or a missed all-reduce moves a step by ~lr = 1e-4."""
    from rlpt.checkpoint import save_checkpoint
    from rlpt.systems.runner import RaySystem
    from rlpt.train import build, load_train_job

    from conftest import TINY_RL

    def parity_build(job, init):   # nested: Ray ships it to the actors by value
        ctl, heldout = build(job, init)
        ctl.env.verify = lambda prompt, response: float(len(response) % 2)
        return ctl, heldout

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    elif ray.available_resources().get("CPU", 0) < 3:   # another file's actors hold this session's Ray
        pytest.skip("the session's Ray has fewer than 3 free CPUs for 1 rollout + 2 trainer actors")
    policy = tiny_gpt()
    save_checkpoint(tmp_path / "init", policy, policy.cfg.to_dict(), {"step": 0})
    job = load_train_job(None, [*TINY_RL, f"init_from={tmp_path / 'init'}", f"run.out_dir={tmp_path}", "steps=3",
                                "trainer.mini_batches=2", "rollout.prompts_per_step=6", "rollout.max_tokens=12",
                                "trainer.optim.lr=1e-4", "system.topology=disaggregated", "system.trainer_workers=2"])
    torch.manual_seed(job.run.seed)
    ctl, _ = parity_build(job, tmp_path / "init")
    local = [ctl.step() for _ in range(3)]
    assert all(m["step/skipped"] == 0 for m in local)
    sys_ = RaySystem(job, parity_build, tmp_path / "init")
    try:
        got, saved = [], None
        for i in range(3):
            got.append(sys_.step())
            if i == 1:
                saved = (sys_.state_dict(), {k: v.clone() for k, v in sys_.trainer.model.state_dict().items()})
        ranks = ray.get([t.digest.remote() for t in sys_.trainer_ranks])
        assert len(sys_.trainer_ranks) == 2 and ranks[0] == ranks[1]
        want = dict(ctl.trainer.model.named_parameters())
        diff = max((p - want[n]).abs().max().item() for n, p in sys_.trainer.model.named_parameters())
        assert 0 < max((p - q).abs().max().item() for p, q in zip(want.values(), policy.parameters()))   # trained
        assert diff <= 2e-6
        for a, b in zip(local, got):
            for k in ("loss", "loss/pg", "loss/kl", "grad/norm", "reward/mean", "staleness/max", "clip/frac"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
        end = ranks[0]
        sys_.trainer.model.load_state_dict(saved[1])      # resume at step 2 (rlpt train's order: weights, state):
        sys_.load_state_dict(saved[0])                    # every rank gets them, and step 3 replays bit for bit
        again = sys_.step()
        assert all(again[k] == got[2][k] for k in ("loss", "grad/norm", "reward/mean"))
        assert ray.get([t.digest.remote() for t in sys_.trainer_ranks]) == [end, end]
    finally:
        sys_.close()
        if started:
            ray.shutdown()
