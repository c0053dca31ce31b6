"""Data-parallel trainer workers: N trainer ranks take one optimizer step over the global batch together.

    rlpt train recipes/grpo_arith.yaml system.topology=disaggregated system.trainer_workers=2

Every rank is a trainer actor (rlpt.systems.workers.TrainerWorker) running the in-process Controller's step on
the SAME groups: advantages, collate and the mini-batch shuffle are computed identically on each rank (same
seed, same generator). The forwards are split: the scoring (below) and the gradients. Inside each mini-batch of
the global batch, rank r takes a contiguous share of the rows, runs its forward/backward on them; the gradients are
summed over the ranks (one flattened all-reduce per optimizer step, gloo on CPU, NCCL on GPU) before the clip
and the AdamW step, which every rank then takes with the same gradient: the replicas never drift. Rank 0 is the
trainer of the topologies: its weights go to the rollout workers, its state to checkpoints.

What "the same global batch" needs, exactly:

  * GRPO's group normalisation, A_i = (r_i − mean_g r) / (std_g r + ε), is computed on whole groups, before any
    split: each rank holds every group, so a row's advantage is the single worker's whatever rank trains it.
    (Splitting groups first and normalising per rank would be exact only if no group straddled two ranks.)
  * The loss's denominators are the GLOBAL mini-batch's. rlpt aggregates with denominators fixed when the
    mini-batch is made (Batch.agg_tokens = Σ_global mask, agg_seqs = B_global), and a rank's share is a
    `select(rows, renormalize=False)`, so it keeps them:
        token-mean               L_r = Σ_{t ∈ rank r} x_t / N_global        Σ_r L_r = L
        seq-mean-token-mean      L_r = Σ_{i ∈ rank r} x̄_i / B_global        Σ_r L_r = L
        seq-mean-token-sum-norm  L_r = Σ_{t ∈ rank r} x_t / (B_global·L)    Σ_r L_r = L
    so ∇L = Σ_r ∇L_r: the gradients are SUMMED over ranks, not averaged. Had each rank normalised by its own
    count N_r (torch DDP's default is the mean of per-rank means), the step would follow
    (1/W)·Σ_r Σ_{t∈r} ∇x_t / N_r: a token on a rank holding fewer tokens would weigh more, the length bias
    the aggregation modes exist to control, and the gradient would differ from the single worker's whenever the
    ranks' token counts differ (tests/test_systems_ddp.py shows both).
  * The metrics are gathered the way micro-batch chunks are merged (rlpt.framework.trainer._merge): `loss/*`
    add up (each rank's is its share of the one loss), `*_max` take the max, the rest are token-weighted means;
    the log-ratio histogram and quantiles see every rank's tokens; the log-prob check takes the worst.

Why not torch's DistributedDataParallel wrapper: it all-reduces inside every backward, so every rank must run the
same number of backward passes, but ranks hold different row counts and lengths (micro-batch chunks, length
buckets, an empty share when a mini-batch has fewer rows than ranks), and it averages. What is here is what DDP
does under `no_sync()` gradient accumulation with a SUM hook: accumulate locally, one all-reduce per optimizer
step. The process group is the rank's own (`ProcessGroupGloo` on a TCPStore rank 0 opens on a free port), not
torch.distributed's default one, which ray.util.collective's gloo transport claims in the trainer actor.

The scoring is split too (`ShardedReference`): each rank scores its 1/W of the trajectories (π_ref, π_prox,
values) and gathers the rest, equal to one process's scores to fp32 rounding (other rows share a padded
micro-batch). Every rank holds a full replica of the weights and the optimizer state: that is the limit where
FSDP (ZeRO-3) is needed, when the weights + gradients + AdamW moments, 16 bytes per parameter in fp32 (rlpt perf
memory), do not fit one device; FSDP shards them over the ranks and gathers each layer's weights for its
forward. gpt_mini (0.8 M parameters, 13 MB of training state) is far from it; not done here.
"""
from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

from rlpt.framework.trainer import Trainer, _merge
from rlpt.framework.trajectory import Batch

TIMEOUT = datetime.timedelta(seconds=300)   # a rank that waits longer for the others fails with gloo's timeout
PLACE_TIMEOUT_S = 180                        # for Ray to start the trainer actors (imports take seconds each)


def open_store(host: str) -> dist.TCPStore:
    """Rank 0's rendezvous: a TCPStore on a free port (port 0: the OS picks; `.port` says which)."""
    return dist.TCPStore(host, 0, None, True, timeout=TIMEOUT, wait_for_workers=False)


class RankGroup:
    """This rank's place in the data-parallel group: sum, gather and broadcast over its own process group."""

    def __init__(self, host: str, port: int, rank: int, world: int, store: dist.TCPStore | None = None,
                 backend: str = "gloo"):
        """Every rank calls this at once (it blocks until all have joined); rank 0 passes the store it opened."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a data-parallel group of {world}")
        self.rank, self.world, self.backend = rank, world, backend
        self.store = store if store is not None else dist.TCPStore(host, port, world, False, timeout=TIMEOUT)
        prefixed = dist.PrefixStore("rlpt_ddp", self.store)
        if backend == "nccl":    # untested here: no GPU on the machine these tests run on
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world)
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world, TIMEOUT)
        else:
            raise ValueError(f"data-parallel backend must be gloo or nccl, got {backend!r}")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([t]).wait()     # AllreduceOptions' default op is SUM
        return t

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self.pg.broadcast([t], opts).wait()
        return t

    def all_gather(self, obj) -> list:
        """Any picklable object from every rank, in rank order (sizes first, then the padded bytes)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        self.pg.allgather([sizes], [torch.tensor([data.numel()])]).wait()
        n = int(max(s.item() for s in sizes))
        buf = torch.zeros(n, dtype=torch.uint8)
        buf[:data.numel()] = data
        outs = [torch.zeros(n, dtype=torch.uint8) for _ in range(self.world)]
        self.pg.allgather([outs], [buf]).wait()
        return [pickle.loads(o[:int(s.item())].numpy().tobytes()) for o, s in zip(outs, sizes)]


def shard_rows(size: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s rows of a mini-batch of `size` rows: contiguous, the first size % world ranks one more."""
    return torch.arange(size).tensor_split(world)[rank]


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's share of a (mini-)batch, keeping the whole batch's aggregation denominators (module doc)."""
    return batch.select(shard_rows(batch.size, rank, world), renormalize=False)


def trained_params(trainer: Trainer) -> list[torch.nn.Parameter]:
    """Everything the optimizer steps, in a fixed order: the policy's parameters, then the critic's."""
    mods = [trainer.model] + ([trainer.critic] if trainer.critic is not None else [])
    return [p for m in mods for p in m.parameters() if p.requires_grad]


class DDPTrainer(Trainer):
    """The Trainer with its gradient accumulation made data-parallel (made by `data_parallel`, not directly).

    train_step is the Trainer's own: the same mini-batches from the same generator on every rank; each
    `accumulate_grads(mb)` trains this rank's share of mb and returns the gradient and metrics of all of mb."""
    group: RankGroup

    def accumulate_grads(self, batch: Batch, loss_fn, check: dict | None = None,
                         log_ratios: list | None = None) -> dict:
        mine = shard(batch, self.group.rank, self.group.world)
        local_check = {} if check is not None else None
        local_ratios: list = []
        metrics = super().accumulate_grads(mine, loss_fn, local_check, local_ratios) if mine.size else {}
        self.reduce_grads()
        tokens = float(mine.mask.sum())
        ratios = torch.cat(local_ratios) if local_ratios else torch.zeros(0)
        parts = self.group.all_gather((tokens, metrics, local_check, ratios))
        if log_ratios is not None:
            log_ratios.extend(p[3] for p in parts)
        if check is not None:
            for _, _, c, _ in parts:
                if c:
                    check["check/logp_mismatch"] = max(check.get("check/logp_mismatch", 0.0), c["check/logp_mismatch"])
                    for k in ("check/logp_mismatch_sum", "check/logp_tokens"):
                        check[k] = check.get(k, 0.0) + c[k]
        return _merge([(n, m) for n, m, _, _ in parts if m])

    def reduce_grads(self) -> None:
        """Σ over ranks of every gradient, in one flattened all-reduce. A parameter no rank produced a gradient
        for keeps grad None (AdamW then skips it, as it would in one process)."""
        params = trained_params(self)
        device = params[0].device                  # NCCL reduces on the GPU the weights live on
        has = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = torch.cat([has] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                  for p in params])
        self.group.all_reduce_sum(flat)
        offset = len(params)
        for p, got in zip(params, flat[:len(params)].tolist()):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone() if got > 0 else None
            offset += n

    @torch.no_grad()
    def broadcast_weights(self) -> None:
        """Rank 0's weights to every rank (what DDP does when it wraps a model): the replicas start equal."""
        for p in trained_params(self):
            self.group.broadcast(p.data)


class ShardedReference:
    """A rank's reference role: it scores its contiguous 1/W of the trajectories (π_ref, and every scorer: π_prox,
    values) and gathers the other ranks' scores, so each rank ends with the whole batch scored, for 1/W of the
    forwards. A row's scores come from a micro-batch of other rows than in one process (another padded length):
    equal to fp32 rounding, not bit for bit."""

    def __init__(self, inner, group: RankGroup):
        self.inner, self.group = inner, group

    def score(self, trajs: list, pad_id: int) -> None:
        rows = shard_rows(len(trajs), self.group.rank, self.group.world).tolist()
        mine = [trajs[i] for i in rows]
        if mine:
            self.inner.score(mine, pad_id)
        names = list(getattr(self.inner, "scorers", {}))
        parts = self.group.all_gather([(i, t.ref_logp, {k: t.extra[k] for k in names}) for i, t in zip(rows, mine)])
        for part in parts:
            for i, ref_logp, extra in part:
                trajs[i].ref_logp = ref_logp
                trajs[i].extra.update(extra)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def data_parallel(trainer: Trainer, group: RankGroup) -> DDPTrainer:
    """The same trainer (its model, optimizer, scheduler, generator, version: shared, not copied) as a rank of
    `group`, its weights replaced by rank 0's."""
    out = DDPTrainer.__new__(DDPTrainer)
    out.__dict__.update(trainer.__dict__)
    out.group = group
    out.broadcast_weights()
    return out


# -- the driver's side (rlpt.systems.runner) -------------------------------------------------------------------
def start_ranks(ray, trainer_cls, args: tuple, world: int, first) -> list:
    """Ranks 1 … world−1 as new trainer actors built like rank 0 (`first`, from the same args and seed), every
    rank joined to one data-parallel group; their weights are checked equal (rank 0's, broadcast)."""
    ranks = [first, *(trainer_cls.remote(*args) for _ in range(world - 1))]
    up, _ = ray.wait([r.info.remote() for r in ranks], num_returns=world, timeout=PLACE_TIMEOUT_S)
    if len(up) < world:   # else rank 0 would wait in the rendezvous for a rank Ray never places
        raise RuntimeError(f"only {len(up)} of system.trainer_workers={world} trainer actors started within "
                           f"{PLACE_TIMEOUT_S} s: the Ray cluster lacks CPUs for them (each actor asks for one; "
                           f"available now: {ray.available_resources().get('CPU', 0)})")
    host, port = ray.get(first.ddp_open.remote())
    digests = ray.get([r.ddp_join.remote(host, port, i, world) for i, r in enumerate(ranks)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel trainer ranks hold different weights after the broadcast: {digests}")
    return ranks


def wait_all(ray, refs: list) -> list:
    """ray.get of every rank's call, raising the first failure as soon as it happens (a rank waiting in a
    collective for a dead peer would otherwise hold the driver until gloo's timeout)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(list(refs))
