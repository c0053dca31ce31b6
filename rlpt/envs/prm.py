"""The `prm` env: arithmetic rewarded by the verifier plus a process reward model's doubt about each step (lesson 17).

    s_k = PRM(prefix up to step k) ∈ (0, 1)          S = the response's steps
    R   = 1[verifier] − c · (1/S) Σ_k (1 − s_k)         (c = env.process_coef, default 0.5)
    per step (for PPO's per-token GAE):  r_k = −c (1 − s_k) / S at step k's delimiter, the rest of R at the last token

One reward, two consumers. GRPO reads the scalar R: the outcome plus a process bonus that separates the
responses of a group the verifier scores alike (an all-wrong group, degenerate under the outcome alone,
gets an advantage from how many of its steps look right). PPO reads `info["step_rewards"]`, the same
process terms placed on the step delimiters (rlpt.algorithms.ppo puts them at those tokens and the
remainder, the outcome, at the last one), so the return is R either way and GAE gives credit per step
(Math-Shepherd's step-by-step PPO). The penalty form keeps R ≤ 0 for a wrong answer and R > 0 for a
right one when c < 1, so `acc/heldout` (reward > 0) still counts correct answers; the gold verdict also
rides in `info["correct"]`. The PRM is frozen: an RL policy can hack it at step granularity (lesson 17).

    rlpt prm init_from=runs/sft_cot run.name=prm
    rlpt train env.name=prm env.model_path=runs/prm init_from=runs/sft_cot [algorithm.name=ppo]
"""
from __future__ import annotations

from rlpt.config import ConfigError
from rlpt.framework.environment import ArithmeticEnv, Prompt, Verdict, register_env
from rlpt.gpt_mini.task import verify
from rlpt.search.scorer import StepScorer, load_scorer
from rlpt.search.steps import END, SEP, step_ends


@register_env("prm")
class ProcessRewardEnv(ArithmeticEnv):
    model_path_arg = "model_path"     # rlpt.train passes env.model_path here

    def __init__(self, task=None, seed: int = 0, tokenizer=None, scorer: StepScorer | None = None,
                 model_path: str | None = None, process_coef: float = 0.5):
        super().__init__(task, seed, tokenizer)
        if scorer is None:
            if model_path is None:
                raise ConfigError("env 'prm' needs a trained process reward model: set env.model_path=<an rlpt prm "
                                  "run folder> (train one with `rlpt prm init_from=<SFT checkpoint>`)")
            scorer = load_scorer(model_path, self.tokenizer)
        if scorer.kind != "prm":
            raise ConfigError(f"env 'prm' needs a PRM, got an {scorer.kind.upper()}: point env.model_path at an "
                              "`rlpt prm` run")
        if not 0 <= process_coef < 1:
            raise ValueError(f"process_coef must be in [0, 1) so that reward > 0 means correct, got {process_coef}")
        self.scorer, self.coef = scorer.eval(), process_coef
        for p in self.scorer.parameters():   # frozen during RL
            p.requires_grad_(False)

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        out = verify(response, prompt.gold)
        ids = self.tokenizer.encode(response)
        ends = step_ends(ids, self.tokenizer.stoi[SEP], self.tokenizer.stoi[END])
        scores = self.scorer.score([(prompt.text, response)])[0] if ends else []
        terms = [-self.coef * (1.0 - s) / len(scores) for s in scores]
        return Verdict(out + sum(terms), {"correct": out == 1.0, "process_reward": sum(terms),
                                          "step_rewards": [[e, x] for e, x in zip(ends, terms)]})
