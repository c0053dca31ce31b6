"""The sub-commands of lesson 17, registered into `rlpt`'s parser by `add_commands(sub)` (rlpt/cli.py).

    rlpt prm [recipe.yaml] init_from=<SFT run> [key=value ...] [--resume]     a process reward model
    rlpt orm [recipe.yaml] init_from=<SFT run> [key=value ...] [--resume]     an outcome reward model
    rlpt search [recipe.yaml] policy=<SFT run> scorer=<prm run> [key=value ...]   strategies x budgets
    rlpt search policy=<SFT run> verifier=<a stronger policy> search.strategies=[best_of_n,weighted_best_of_n]

The job schemas (ScorerJob, SearchJob) open rlpt/search/jobs.py.
"""
from __future__ import annotations

import argparse

from rlpt.config import ConfigError, key_list, load_config, split_recipe_args


def cmd_scorer(kind: str):
    def run(args) -> int:
        from rlpt.report import fmt, table, write_report
        from rlpt.search.jobs import ScorerJob, train_scorer
        path, overrides = split_recipe_args(args.items)
        job = load_config(ScorerJob, path, overrides, base={"run": {"name": kind}, "scorer": {"kind": kind}})
        if job.scorer.kind != kind:
            raise ConfigError(f"rlpt {kind} trains an {kind.upper()}: drop scorer.kind={job.scorer.kind} "
                              f"(or run rlpt {job.scorer.kind})")
        _, run_, final = train_scorer(job, resume=args.resume, allow_change=args.allow_change)
        main = f"{kind}/step_auroc_heldout" if kind == "prm" else f"{kind}/outcome_auroc_heldout"
        report = write_report(run_, f"{kind.upper()} (lesson 17)", final,
                              plots={"auroc": [main, f"{kind}/outcome_auroc_heldout"],
                                     "loss": ["loss/bce", "loss/bce_heldout"]})
        print(table([(k, fmt(v)) for k, v in final.items()] + [("run folder", str(run_.dir)), ("report", str(report))]))
        return 0
    return run


def cmd_search(args) -> int:
    from rlpt.search.jobs import SearchJob, run_search, search_table
    path, overrides = split_recipe_args(args.items)
    job = load_config(SearchJob, path, overrides)
    run_, rows = run_search(job)
    print(search_table(rows))
    print(f"run folder: {run_.dir}   report: {run_.dir / 'report.md'}")
    return 0


def add_commands(sub) -> None:
    """Register `rlpt prm`, `rlpt orm` and `rlpt search` on rlpt's sub-parsers."""
    for kind, help_ in (("prm", "a process reward model: Monte-Carlo step labels from the SFT policy, BCE at each "
                                "step's delimiter (lesson 17)"),
                        ("orm", "an outcome reward model: the same SFT trunk + scalar head, BCE on the verdict "
                                "at the last token (lesson 17)")):
        j = sub.add_parser(kind, help=help_)
        j.add_argument("items", nargs="*", metavar="[recipe.yaml] [key=value ...]")
        j.add_argument("--resume", action="store_true", help="continue the run folder from its latest checkpoint")
        j.add_argument("--allow-change", default=(), metavar="KEY,...", type=key_list,
                       help="with --resume: the config keys (or sections) that may differ from config.yaml")
        j.set_defaults(fn=cmd_scorer(kind))
    s = sub.add_parser("search", help="test-time search (greedy, majority, best-of-N, weighted, beam, DVTS) at "
                                      "several budgets: accuracy, tokens spent, a table and a plot",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("items", nargs="*", metavar="[recipe.yaml] [key=value ...]")
    s.set_defaults(fn=cmd_search)
