"""rlpt.search: outcome and process reward models and test-time search (lesson 17).

Files, one concept each: steps (step split, delimiter positions, exact step truth), labels (Monte-Carlo
process labels, TRL stepwise JSONL, AUROC), scorer (ORM / PRM: SFT trunk + scalar head, BCE), strategies
(greedy, majority, best-of-N, weighted best-of-N, step-level beam, DVTS), jobs (`rlpt prm`, `rlpt orm`,
`rlpt search`), cli (their sub-commands). The `prm` reward env for RL lives in rlpt/envs/prm.py.
"""
