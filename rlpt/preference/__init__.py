"""Learning from preferences (lessons 15–16): pairs, the DPO family, a Bradley–Terry reward model.

    data.py          PreferencePair, load_pairs (JSONL), sample_pairs (from the policy, verifier-ranked), collate_pairs
    dpo.py           sequence log-probs; DPO / IPO / KTO / ORPO / SimPO losses; the `rlpt dpo` job
    reward_model.py  RewardModel (SFT trunk + scalar head), Bradley–Terry loss, the `rlpt rm` job, the
                     `reward_model` env (RM score as reward, gold correctness in info)

The RLHF recipe on the toy (hidden "human" -> RM -> PPO, swept over β) drives the SFT, RM and RL jobs
from above, so it is a repository example: `python examples/rlhf.py recipes/rlhf_arith.yaml`.

Importing this package registers the `reward_model` env.
"""
from rlpt.preference import reward_model as _reward_model  # noqa: F401 - registers the env
from rlpt.preference.data import PairBatch, PreferencePair, collate_pairs, load_pairs, sample_pairs, save_pairs

__all__ = ["PairBatch", "PreferencePair", "collate_pairs", "load_pairs", "sample_pairs", "save_pairs"]
