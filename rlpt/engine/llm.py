"""`LLM`: the engine behind a vLLM-shaped API. Each step is schedule → run → postprocess.

    llm = LLM(model, tokenizer)          # a gpt_mini GPT, or a HF Llama / Qwen2 / Mistral (or an HFPolicy, peft model)
    outs = llm.generate(["<3+4>", [5, 6, 7]], SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=0))
    outs[0].outputs[j].token_ids / .text / .token_logprobs / .finish_reason     # "stop" | "length"
    llm.update_weights(trainer.model.state_dict())               # in place (copy_); bumps llm.version

One step: the scheduler picks a token chunk per sequence (continuous batching, chunked prefill,
preemption), copy-on-write block copies are done, the draft proposes (if any), one target forward runs
over every chunk, then new tokens are sampled or verified, appended, and finished sequences release
their blocks into the prefix cache. `token_logprobs[i]` is log p(y_i) under the distribution y_i was
drawn from (temperature / top-k / top-p applied: `processed_logp`), recorded at sampling time.

Bad input (empty prompt list or prompt, prompt too long for the context, unknown token ids, invalid
SamplingParams, a state dict with missing / unexpected / mis-shaped tensors) is a ValueError that
names what is wrong, raised before any state changes; an exception mid-generate aborts that call's
sequences so no block leaks and the engine stays usable.
"""
from __future__ import annotations

import itertools
import operator

import torch

from rlpt.config import quote
from rlpt.engine.block_manager import BlockManager, cdiv
from rlpt.engine.model_runner import Chunk, ModelRunner
from rlpt.engine.radix_cache import RadixCache
from rlpt.engine.sampling import SamplingParams, processed_logp_rows, sample
from rlpt.engine.scheduler import ScheduledSeq, Scheduler
from rlpt.engine.sequence import CompletionOutput, Request, RequestOutput, Sequence
from rlpt.engine.spec_decode import SpeculativeDecoder
from rlpt.engine.weights import served_model, why_not_served
from rlpt.gpt_mini.generate import stop_set


def serves(model) -> bool:
    """Whether the engine can run `model`: a gpt_mini GPT or a HF Llama / Qwen2 / Mistral, bare, in an
    HFPolicy or under a peft adapter (its weights are read in place: rlpt.engine.weights)."""
    return why_not_served(model) is None


def _check_model(model, what: str) -> None:
    why = why_not_served(model)
    if why is not None:
        raise ValueError(f"{what} cannot be served by the engine: {why}")


class LLM:
    def __init__(self, model, tokenizer=None, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int = 256 << 20, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, draft_model=None, num_speculative_tokens: int = 4,
                 eos_id: int | tuple[int, ...] | None = None, seed: int = 0, max_model_len: int | None = None):
        _check_model(model, "model")
        if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1, got "
                             f"{block_size}, {max_num_seqs}, {max_num_batched_tokens}")
        self.model, self.tokenizer = model, tokenizer
        # max_model_len (vLLM's name) caps the context: a real model's 32k positions would size the KV pool
        served = served_model(model, max_model_len)
        c = served.cfg
        self.max_seq_len, self.vocab_size = c.max_seq_len, c.vocab_size
        if eos_id is None:   # rlpt's tokenizers say eos_id (an HF model's may add stop_ids), HF's eos_token_id
            eos_id = getattr(tokenizer, "stop_ids", None) or getattr(tokenizer, "eos_id",
                                                                     getattr(tokenizer, "eos_token_id", None))
        self.eos_id = eos_id            # one id, or several (a model's generation_config may list more)
        per_seq = cdiv(self.max_seq_len, block_size)
        if num_blocks is None:
            per_block = 2 * c.n_layer * c.n_kv_head * c.head_dim * block_size * served.embed.element_size()
            num_blocks = max(per_seq + 1, min(max_num_seqs * per_seq + 1, kv_cache_bytes // per_block))
        if num_blocks < per_seq + 1:
            raise ValueError(f"num_blocks={num_blocks} cannot hold one sequence of model.max_seq_len="
                             f"{self.max_seq_len} tokens: need >= {per_seq + 1} blocks of {block_size}")
        self.bm = BlockManager(num_blocks, block_size)
        self.cache = RadixCache(self.bm) if enable_prefix_caching else None
        self.runner = ModelRunner(model, num_blocks, block_size, max_model_len)
        self.spec = None
        if draft_model is not None:
            _check_model(draft_model, "draft_model")
            draft = ModelRunner(draft_model, num_blocks, block_size, max_model_len)
            if draft.cfg.vocab_size != self.vocab_size or draft.cfg.max_seq_len < self.max_seq_len:
                raise ValueError("draft_model needs the target's vocab_size and a max_seq_len >= the target's")
            self.spec = SpeculativeDecoder(draft, num_speculative_tokens)
        self.scheduler = Scheduler(self.bm, self.cache, max_num_seqs, max_num_batched_tokens,
                                   num_speculative_tokens if self.spec else 0)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0
        self._ids = itertools.count()
        self.stats = dict.fromkeys(("engine/steps", "tokens/prefill", "tokens/recompute", "tokens/decode",
                                    "tokens/generated", "tokens/shared_by_fork"), 0)

    # -- public API ---------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 on_finish=None) -> list[RequestOutput]:
        """`on_finish(i, j, completion)`, if given, is called the step sample j of prompt i finishes (a verifier
        can start on it while the rest decode: rlpt.framework.dispatch); the return value is as without it."""
        prompts = self._normalize_prompts(prompts)
        sps = sampling_params if isinstance(sampling_params, list) else \
            [sampling_params or SamplingParams()] * len(prompts)
        if len(sps) != len(prompts):
            raise ValueError(f"got {len(sps)} SamplingParams for {len(prompts)} prompts")
        for sp in sps:
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be rlpt.engine.SamplingParams, got {type(sp).__name__}")
            sp.__post_init__()                      # re-check: a field may have been changed since
        encoded = [self._encode(i, p) for i, p in enumerate(prompts)]
        if self.runner.refresh() and self.cache is not None:   # weights changed behind our back
            self.cache.reset()
        if self.spec is not None:
            self.spec.runner.refresh()
        requests = [self._add_request(p, ids, sp) for p, ids, sp in zip(prompts, encoded, sps)]
        reported: set[tuple[int, int]] = set()
        try:
            while self.scheduler.has_work():        # the API is synchronous: all work is this call's
                self.step()
                if on_finish is not None:
                    self._report_finished(requests, reported, on_finish)
        except BaseException:
            self.scheduler.abort([s for r in requests for s in r.seqs])
            raise
        return [self._output(r) for r in requests]

    @torch.no_grad()
    def update_weights(self, state_dict: dict, draft: bool = False) -> int:
        """Copy `state_dict` into the model (or the draft) in place; checked fully before any copy."""
        if draft and self.spec is None:
            raise ValueError("update_weights(draft=True) but the engine has no draft model")
        served = (self.spec.runner if draft else self.runner).served
        own = served.module.state_dict()            # names as the model spells them (gpt_mini's, or HF's)
        tied = served.tied_names                     # (embedding, head) when the head is the embedding
        missing = [k for k in own if k not in state_dict and not (tied and k == tied[1])]
        unexpected = [k for k in state_dict if k not in own]
        shapes = [f"{k}: expected {tuple(own[k].shape)}, got "
                  f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}" for k, v in state_dict.items()
                  if k in own and (not torch.is_tensor(v) or v.shape != own[k].shape)]
        if missing or unexpected or shapes:
            parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                     f"mis-shaped {shapes}" if shapes else ""]
            raise ValueError("update_weights: state dict does not fit the model: " + "; ".join(p for p in parts if p))
        if tied and tied[1] in state_dict and tied[0] in state_dict and \
                not torch.equal(state_dict[tied[1]], state_dict[tied[0]]):
            raise ValueError(f"update_weights: the model ties {tied[1]} to {tied[0]}, but they differ")
        for k, v in state_dict.items():
            own[k].copy_(v)
        (self.spec.runner if draft else self.runner).refresh()
        if self.cache is not None:
            self.cache.reset()                     # cached K/V were computed by the old weights
        if not draft:
            self.version += 1
        return self.version

    def reset_prefix_cache(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def check_invariants(self) -> None:
        """Block refcounts match their holders; with nothing running, every block is free or cache-only."""
        self.bm.check([s.block_table for s in self.scheduler.running])
        if not self.scheduler.has_work() and self.bm.num_available != self.bm.num_blocks:
            raise AssertionError(f"{self.bm.num_blocks - self.bm.num_available} KV blocks leaked while idle")

    def metrics(self) -> dict:
        out = dict(self.stats, **{"engine/preemptions": self.scheduler.num_preemptions,
                                  "kv/blocks_peak": self.bm.peak_used, "kv/blocks_total": self.bm.num_blocks,
                                  "kv/bytes_per_block": self.runner.kv.bytes_per_block,
                                  "weights/version": self.version})
        if self.cache is not None:
            out.update(self.cache.metrics())
        if self.spec is not None:
            out["spec/acceptance_rate"] = self.spec.accepted / max(1, self.spec.proposed)
        return out

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> None:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            raise RuntimeError("scheduler made no progress (KV pool too small for the waiting sequence?)")
        if sched.copies:                                             # copy-on-write, both K/V pools
            src, dst = (torch.tensor(x, device=self.runner.cis.device) for x in zip(*sched.copies))
            self.runner.kv.copy_blocks(src, dst)
            if self.spec is not None:
                self.spec.runner.kv.copy_blocks(src, dst)
        spec_items = [it for it in sched.scheduled if it.k]
        q = self.spec.propose(spec_items) if spec_items else None
        ctx = self.runner.needs_context   # a model with operand-index embeddings reads each sequence's tokens so far
        logits = self.runner.run([Chunk(it.seq.token_ids[it.start:it.start + it.n_tokens] + it.draft, it.start,
                                        it.seq.block_table, it.k + 1 if it.k else int(it.samples),
                                        it.seq.token_ids[:it.start + it.n_tokens] + it.draft if ctx else None)
                                  for it in sched.scheduled])
        self._postprocess(sched.scheduled, logits, q)
        self.stats["engine/steps"] += 1

    def _postprocess(self, scheduled: list[ScheduledSeq], logits: torch.Tensor, q) -> None:
        row, plain, spec_rows, spec_items = 0, [], [], []
        prefill = recompute = decode = 0
        for it in scheduled:
            seq, start, n = it.seq, it.start, it.n_tokens
            if n == 1 and start >= seq.prompt_len:                  # the common case: one decode token
                decode += 1 + it.k
            else:
                prompt_part = max(0, min(seq.prompt_len, start + n) - start)
                prefill += prompt_part
                recompute += n - prompt_part
            if it.k:
                spec_items.append(it)
                spec_rows.extend(range(row, row + it.k + 1))
                row += it.k + 1
                continue
            was_prefilling = seq.num_computed < seq.prompt_len
            seq.num_computed = start + n
            if was_prefilling and seq.num_computed >= seq.prompt_len:
                self.scheduler.cache_prompt(seq)
            if start + n == seq.num_tokens:                          # caught up: its logits give a token
                plain.append((seq, row))
                row += 1
        st = self.stats
        st["tokens/prefill"] += prefill
        st["tokens/recompute"] += recompute
        st["tokens/decode"] += decode
        if plain:
            self._sample_plain(plain, logits)
        if spec_items:
            results = self.spec.verify(spec_items, logits[spec_rows], q)
            for it, (toks, lps, logp_rows) in zip(spec_items, results):
                seq, n = it.seq, it.seq.num_tokens
                seq.draft_computed = min(n + it.k - 1, n + len(toks) - 1)
                seq.num_computed = n + len(toks) - 1
                for t, lp, r in zip(toks, lps, logp_rows):
                    if self._append(seq, t, lp, r):
                        break
                if not seq.is_finished:
                    seq.num_computed = min(seq.num_computed, seq.num_tokens - 1)
                    self.bm.release(seq.block_table, keep=cdiv(seq.num_tokens, self.bm.block_size))

    def _sample_plain(self, plain: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        targets, rows = [], []
        for seq, row in plain:
            req = seq.request
            if req.params.n > 1 and len(req.seqs) == 1 and seq.num_output == 0:    # the leader: fork n-1
                for j in range(1, req.params.n):
                    child = Sequence(next(self._ids), req, j, list(req.prompt_ids), len(req.prompt_ids))
                    req.seqs.append(child)
                    self.scheduler.fork(seq, child)
                    self.stats["tokens/shared_by_fork"] += seq.num_computed
                    targets.append(child)
                    rows.append(row)
            targets.append(seq)
            rows.append(row)
        params = [s.request.params for s in targets]
        if len(rows) != logits.shape[0] or rows[-1] != len(rows) - 1:
            logits = logits[torch.tensor(rows, device=logits.device)]
        logp = processed_logp_rows(logits, params)                                   # (M, V)
        greedy = [p.temperature == 0 for p in params]
        tok = sample(logp, greedy, [] if all(greedy) else [s.seed for s in targets],
                     [] if all(greedy) else [s.num_output for s in targets])
        lp = logp.gather(1, tok[:, None]).squeeze(1)
        want_top = any(p.logprobs for p in params)
        for i, (s, t, l) in enumerate(zip(targets, tok.tolist(), lp.tolist())):
            self._append(s, t, l, logp[i] if want_top else None)

    def _append(self, seq: Sequence, tok: int, lp: float, logp_row: torch.Tensor | None) -> bool:
        """Add one sampled token; finish the sequence on a stop token, a stop string or its length cap."""
        seq.token_ids.append(tok)
        seq.logps.append(lp)
        req = seq.request
        sp = req.params
        self.stats["tokens/generated"] += 1
        if logp_row is not None and sp.logprobs:
            top = torch.topk(logp_row, min(sp.logprobs, logp_row.shape[-1]))
            seq.top_logprobs.append({tok: lp, **dict(zip(top.indices.tolist(), top.values.tolist()))})
        reason = None
        if tok in req.stop_ids:
            reason, seq.stop_reason = "stop", tok
        elif sp.stop:
            text = self.tokenizer.decode(seq.output_ids)
            hits = [(text.find(s), s) for s in sp.stop if s in text]
            if hits:
                at, s = min(hits)
                reason, seq.stop_reason, seq.text = "stop", s, text[:at]
        if reason is None and seq.num_output >= req.max_output:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
        return reason is not None

    def _report_finished(self, requests: list[Request], reported: set, on_finish) -> None:
        """Hand each sequence that finished since the last call to `on_finish(prompt index, sample index, output)`."""
        for i, req in enumerate(requests):
            new = [s.index for s in req.seqs if s.is_finished and (i, s.index) not in reported]
            if new:
                outs = self._output(req).outputs    # sorted by index, all n forked at the first sample
                for j in new:
                    reported.add((i, j))
                    on_finish(i, j, outs[j])

    # -- requests -----------------------------------------------------------------------------
    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("generate() needs a non-empty list of prompts (strings or token-id lists)")
        return list(prompts)

    def _encode(self, i: int, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {i} is a string but the LLM has no tokenizer; pass token ids")
            try:
                ids = list(self.tokenizer.encode(prompt))
            except ValueError as e:   # the tokenizer's message may quote the whole prompt: cut it
                msg = str(e)
                raise ValueError(f"prompt {i} cannot be tokenized: "
                                 f"{msg if len(msg) <= 300 else msg[:300] + '...'}") from None
        else:
            try:
                ids = [operator.index(t) for t in prompt]   # ints, numpy ints, 0-d integer tensors; not 1.5
            except TypeError:
                raise ValueError(f"prompt {i} must be a string or a list of int token ids, "
                                 f"got {quote(prompt, 80)}") from None
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; model.max_seq_len={self.max_seq_len} leaves "
                             f"no room to generate (at most {self.max_seq_len - 1} prompt tokens)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:4]} outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def _add_request(self, prompt, ids: list[int], sp: SamplingParams) -> Request:
        seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))
        eos = set(stop_set(self.eos_id)) if self.eos_id is not None and not sp.ignore_eos else set()   # one or several
        stop = set(sp.stop_token_ids) | eos
        if sp.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop (stop strings) needs a tokenizer to decode text")
        req = Request(next(self._ids), prompt if isinstance(prompt, str) else None, ids, sp, seed,
                      frozenset(stop), min(sp.max_tokens, self.max_seq_len - len(ids)))
        leader = Sequence(next(self._ids), req, 0, list(ids), len(ids))
        req.seqs.append(leader)
        self.scheduler.add(leader)
        return req

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for s in sorted(req.seqs, key=lambda s: s.index):
            ids = s.output_ids
            text = s.text
            if text is None and self.tokenizer is not None:
                text = self.tokenizer.decode(ids[:-1] if s.stop_reason in req.stop_ids and ids else ids)
            outs.append(CompletionOutput(s.index, text or "", ids, list(s.logps), float(sum(s.logps)),
                                         s.finish_reason, s.stop_reason,
                                         s.top_logprobs if s.params.logprobs else None))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs)
