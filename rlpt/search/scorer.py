"""Outcome and process reward models: the SFT trunk and a scalar head, trained with BCE (lesson 17).

    logit_t = w · h_t + b         h_t = the trunk's final hidden state at token t
    PRM:  score_k = σ(logit at the delimiter of step k)      target p̂_k (Monte-Carlo soft label)
    ORM:  score   = σ(logit at the response's last token)     target 1[verifier]
    L = −mean over read positions [ y log σ(logit) + (1 − y) log(1 − σ(logit)) ]
    + rank_coef · L_rank     L_rank = mean over pairs (i right, j wrong, same prompt) of −log σ(z_i − z_j)
                             z = the logit at a response's last read position (its final score)

The same model serves both (lesson 17: "same architecture as the BT RM, only the objective differs"):
an ORM is a PRM whose only labelled position is the last one, so `kind` changes the targets, not the
network. The head is read at the step delimiters and nowhere else (`boundary_targets` builds the mask;
`bce_at` ignores every other position), and it starts at zero: every score starts at 0.5.
The trunk starts from the SFT policy (it already reads the task), as rlpt.preference.reward_model's.

Scoring a partial response (beam search) reads the PRM at its last delimiter: the prefix's score.

`logp_feature=True` (`rlpt prm scorer.logp_feature=true`) adds the trunk's own generative-verifier reading
to the logit, from the same forward pass (its language-model head, which the plain head never reads):

    logit_t = w · h_t + b + a · f_t      f_t = (Σ_step log π, Σ_prefix log π, min_step log π) at position t
    Σ_step / min_step: over the response tokens of the step that ends at t; Σ_prefix: over response tokens ≤ t

with a = (0, 1, 0) at the start: the untrained PRM scores a prefix σ(log π(prefix)), the generative verifier
(`LogProbScorer`) up to a monotone map, and BCE (and the ranking term) then move w, b, a and the trunk —
gradients reach the step log-probs too, so the language model is fine-tuned as a verifier on the MC labels.
Why: the plain head judges one step at AUROC 0.59-0.77 while the same trunk's log-prob separates the held-out
steps perfectly (docs/search.md section 3b part 4): the information is in the LM head, not in h_t.
`aux` (`scorer.logp_aux=<checkpoint>`): a second, frozen language model whose three features the head reads
too (a starts at (0, 1, 0, 0, 1, 0): σ(log π(prefix) + log π_aux(prefix)), a product of the two verifiers),
e.g. one trained on prompts as long as the slice the trunk fails on (docs/search.md section 3c).

Why the ranking term (`rank_loss`): best-of-N compares the candidates of *one* prompt, and BCE pooled over
prompts mostly learns which prompts are hard (docs/search.md: pooled outcome AUROC 0.78, within a prompt
0.54-0.61). The pairwise logistic loss of lesson 16's Bradley-Terry reward model, taken only between a
prompt's own right and wrong responses, trains exactly the comparison the search makes; BCE keeps the
scores calibrated (the beam and the `prm` env read them as probabilities).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlpt.checkpoint import CheckpointError, load_weights, read_checkpoint_meta, resolve_checkpoint
from rlpt.framework.critic import capture_hidden
from rlpt.framework.trajectory import pad_sequences
from rlpt.gpt_mini.model import GPT, GPTConfig
from rlpt.gpt_mini.task import parse_prompt
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.search.steps import END, SEP, outcome, step_ends, true_step_labels

KINDS = ("prm", "orm")
FEATURES = ("step_logp", "prefix_logp", "step_min_logp")      # what `logp_feature` adds, in this order


class StepScorer(nn.Module):
    """A trunk with a scalar head read at chosen positions; `kind` is 'prm' (every delimiter) or 'orm' (the last)."""

    def __init__(self, trunk: nn.Module, tok: CharTokenizer, kind: str = "prm", logp_feature: bool = False,
                 aux: nn.Module | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"scorer kind must be one of {KINDS}, got {kind!r}")
        self.trunk, self.kind, self.tok, self.logp_feature = trunk, kind, tok, logp_feature
        self.head = nn.Linear(trunk.cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)     # every score starts at σ(0) = 0.5; no RNG consumed
        nn.init.zeros_(self.head.bias)
        if aux is not None and not logp_feature:
            raise ValueError("a scorer's aux model is read through its log-prob features: set logp_feature=True")
        self.aux = aux
        if aux is not None:                  # frozen: the head learns how much to trust it, not its weights
            aux.requires_grad_(False).eval()
        if logp_feature:                     # ... or at σ(log π(prefix)): the generative verifier
            n = 1 + (aux is not None)
            self.feat = nn.Linear(n * len(FEATURES), 1, bias=False)
            with torch.no_grad():
                self.feat.weight.copy_(torch.tensor([[0.0, 1.0, 0.0] * n]))

    @property
    def cfg(self) -> GPTConfig:
        return self.trunk.cfg

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> head logits (B, T) at every position; the loss and `score` pick the ones they read."""
        with capture_hidden(self.trunk) as store:
            lm = self.trunk(ids)
        out = self.head(store[-1].float()).squeeze(-1)                         # (B, T)
        if self.logp_feature:
            f = logp_features(lm, ids, self.tok)                               # (B, T, 3)
            if self.aux is not None:
                with torch.no_grad():
                    f = torch.cat([f, logp_features(self.aux(ids), ids, self.tok)], -1)   # (B, T, 6)
            out = out + self.feat(f).squeeze(-1)
        return out

    def read_positions(self, prompt_len: int, response_ids: list[int]) -> list[int]:
        """Full-sequence positions the head is read at: each step delimiter (PRM) or the last token (ORM)."""
        ends = step_ends(response_ids, self.tok.stoi[SEP], self.tok.stoi[END])
        if self.kind == "orm":
            ends = [len(response_ids) - 1] if response_ids else []
        return [prompt_len + e for e in ends]

    @torch.no_grad()
    def score(self, rows: list[tuple[str, str]]) -> list[list[float]]:
        """[(prompt, response text)] -> per row the scores σ(logit) at its read positions, in step order.
        A partial response (no `#` yet) is scored at the delimiters it has: the prefix's value."""
        if not rows:
            return []
        L = self.cfg.max_seq_len
        prompts = [self.tok.encode(p) for p, _ in rows]
        responses = [self.tok.encode(r)[: max(0, L - len(p))] for p, (_, r) in zip(prompts, rows)]
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(rows), 512):
            ids, _ = pad_sequences(prompts[i:i + 512], responses[i:i + 512], self.tok.pad_id)   # (b, T)
            prob = torch.sigmoid(self(ids))                                                      # (b, T)
            for b, (p, r) in enumerate(zip(prompts[i:i + 512], responses[i:i + 512])):
                out.append(prob[b, self.read_positions(len(p), r)].tolist())
        self.train(was)
        return out

    def calibrate(self, ids: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """Before training, with the hidden-state head still zero: fit one scale s and one shift c of the feature
        path's logit, s · (a · f + b) + c, by logistic regression on these rows (BCE at the read positions;
        LBFGS), and fold them into a and b. The start keeps the verifiers' ranking with probabilities on the
        labels' scale (with an aux model the product σ(log π + log π_aux) starts at BCE ~10, and BCE training
        from there destroyed the ranking: docs/search.md section 3c). -> (s, c)."""
        if not self.logp_feature or bool(self.head.weight.any()):
            raise ValueError("calibrate() fits the log-prob feature path of an untrained scorer (head weight zero)")
        with torch.no_grad():
            base = self(ids)                                                        # (B, T) = a · f + b
        s, c = torch.ones(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([s, c], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = bce_at(s * base + c, target, mask)
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            self.feat.weight.mul_(s)
            self.head.bias.copy_(s * self.head.bias + c)
        return s.item(), c.item()

    def meta(self) -> dict:
        return {**self.cfg.to_dict(), "kind": self.kind, "logp_feature": self.logp_feature,
                "aux": self.aux.cfg.to_dict() if self.aux is not None else None}


def logp_features(logits: torch.Tensor, ids: torch.Tensor, tok: CharTokenizer) -> torch.Tensor:
    """LM logits (B, T, V) and ids (B, T) -> (B, T, 3) `FEATURES` at every position t, from the log-probs
    log π(ids_u | ids_<u) of the response tokens u ≤ t only (after the prompt's `>`; a step starts after `>`,
    `,` or `#`). Causal: position t reads nothing after t, so right padding never reaches a read position."""
    B, T = ids.shape
    lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)   # (B, T-1)
    lp = F.pad(lp, (1, 0))                                                      # lp[:, t]: token t's log-prob
    gt = ids == tok.stoi[">"]
    resp = (gt.long().cumsum(1) - gt.long()) > 0                                # strictly after the prompt
    lp = lp * resp
    prefix = lp.cumsum(1)                                                       # (B, T)
    bound = gt | (ids == tok.stoi[SEP]) | (ids == tok.stoi[END])
    pos = torch.arange(T).expand(B, T)
    last = torch.where(bound, pos, torch.zeros_like(pos)).cummax(1).values      # last boundary ≤ t
    before = F.pad(last[:, :-1], (1, 0))                                        # last boundary < t
    step = prefix - prefix.gather(1, before)                                    # Σ over (before, t]
    mins, run = [], lp[:, 0]
    for t in range(T):                                                          # running min, reset per step
        run = lp[:, t] if t == 0 else torch.where(bound[:, t - 1], lp[:, t], torch.minimum(run, lp[:, t]))
        mins.append(run)
    return torch.stack([step, prefix, torch.stack(mins, 1)], -1)               # (B, T, 3)


def boundary_targets(scorer: StepScorer, prompts: list[list[int]], responses: list[list[int]],
                     labels: list[list[float]], outcomes: list[float]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids (B, T), targets (B, T) and the read mask (B, T): 1 exactly at the positions the head is
    read (PRM: each delimiter with its soft label; ORM: the last token with the outcome)."""
    ids, _ = pad_sequences(prompts, responses, scorer.tok.pad_id)
    target, mask = torch.zeros(ids.shape), torch.zeros(ids.shape)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        pos = scorer.read_positions(len(p), r)
        ys = [outcomes[b]] if scorer.kind == "orm" else labels[b][:len(pos)]
        for t, y in zip(pos, ys):
            target[b, t], mask[b, t] = y, 1.0
    return ids, target, mask


def bce_at(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) logits, soft targets and read mask -> BCE averaged over the read positions only."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")   # (B, T)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def last_read(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) read mask -> (B,) the position of each row's last read (its final score), (B,) whether it has one."""
    T = mask.shape[1]
    return T - 1 - mask.flip(1).argmax(1), mask.sum(1) > 0


def rank_pairs(correct: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B,) verdicts and prompt ids -> (B, B) bool, True at (i, j) iff i is right, j wrong, same prompt."""
    return (group[:, None] == group[None, :]) & correct[:, None] & ~correct[None, :]


def rank_loss(z: torch.Tensor, correct: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Within-prompt pairwise logistic loss on final logits z (B,), verdicts `correct` (B,) bool and prompt
    ids `group` (B,):

        L_rank = (1 / |P|) Σ_{(i, j) ∈ P} −log σ(z_i − z_j)      P = {(i, j): group_i = group_j, y_i = 1, y_j = 0}

    Responses of different prompts are never compared. No pair in the batch: 0 (with a graph, so the
    caller's backward still runs)."""
    pair = rank_pairs(correct, group)
    if not pair.any():
        return z.sum() * 0.0
    return F.softplus(-(z[:, None] - z[None, :])[pair]).mean()            # softplus(−d) = −log σ(d)


def load_scorer(path, tok: CharTokenizer | None = None) -> StepScorer:
    """A scorer from an `rlpt prm` / `rlpt orm` checkpoint or run folder; a policy checkpoint is a clear error."""
    path = resolve_checkpoint(path)
    meta = dict(read_checkpoint_meta(path))
    kind = meta.pop("kind", None)
    logp_feature = bool(meta.pop("logp_feature", False))
    aux = meta.pop("aux", None)
    if kind not in KINDS:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a PRM or ORM (kind {kind!r}): train one with "
                              "`rlpt prm init_from=<SFT checkpoint>` or `rlpt orm init_from=...`")
    scorer = StepScorer(GPT(GPTConfig(**meta)), tok or CharTokenizer(), kind, logp_feature,
                        GPT(GPTConfig(**aux)) if aux else None)
    load_weights(path, scorer)
    return scorer.eval()


class OracleScorer:
    """The exact verifier as a scorer (for tests and ceilings): each step's exact prefix truth, and the
    outcome at the last step of a finished response. Best-of-N with it is pass@N."""
    kind = "oracle"

    def score(self, rows: list[tuple[str, str]]) -> list[list[float]]:
        out = []
        for p, r in rows:
            prob = parse_prompt(p)
            truth = [float(x) for x in true_step_labels(prob, r)]
            if truth and r.endswith(END):
                truth[-1] = float(outcome(prob, r))
            out.append(truth)
        return out


class LogProbScorer:
    """A generative verifier: a policy's own probability of each step prefix,

        score_k = exp Σ_{t ≤ delimiter k} log π(y_t | x, y_<t)

    No head, no training: a stronger policy than the searched one judges the candidates by how likely it is
    to have written them (a wrong sum is unlikely to a model that adds well). Products of token
    probabilities, so the last score is the whole response's and weighted best-of-N sums probability mass
    per answer; the score falls with every token, so beam search with it prefers short prefixes (use it
    for best-of-N)."""
    kind = "logprob"

    def __init__(self, model: nn.Module, tok: CharTokenizer):
        self.model, self.tok = model, tok

    @torch.no_grad()
    def score(self, rows: list[tuple[str, str]]) -> list[list[float]]:
        if not rows:
            return []
        L = self.model.cfg.max_seq_len
        prompts = [self.tok.encode(p) for p, _ in rows]
        responses = [self.tok.encode(r)[: max(0, L - len(p))] for p, (_, r) in zip(prompts, rows)]
        was = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(rows), 512):
            ids, _ = pad_sequences(prompts[i:i + 512], responses[i:i + 512], self.tok.pad_id)    # (b, T)
            logp = torch.log_softmax(self.model(ids).float(), -1)                               # (b, T, V)
            tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)                      # (b, T-1)
            for b, (p, r) in enumerate(zip(prompts[i:i + 512], responses[i:i + 512])):
                cum = tok_lp[b, len(p) - 1:len(p) - 1 + len(r)].cumsum(0)                     # (R,)
                ends = step_ends(r, self.tok.stoi[SEP], self.tok.stoi[END])
                out.append(cum[ends].exp().tolist())
        self.model.train(was)
        return out
