"""rlpt/data (lesson 18a): the signal identities by enumeration, the buckets' edges, Wilson intervals by hand,
MinHash recall on generated paraphrases and precision on distinct problems, decontamination, bad rows, and
`rlpt data curate` end to end on a tiny policy."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from rlpt.cli import main
from rlpt.config import ConfigError
from rlpt.data.decontam import EvalIndex, decontaminate, ngrams
from rlpt.data.dedup import exact_dedup, jaccard, near_dedup, normalise, shingles
from rlpt.data.difficulty import Z95, bucket, in_band, wilson
from rlpt.data.prompts import PromptRow, read_jsonl, read_prompts
from rlpt.data.signal import degenerate_fraction, signal, wasted, wasted_fraction


# -- the signal (lesson 18a §12.1) -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_signal_identities_by_enumeration(k, p):
    """Over every reward vector in {0,1}^K weighted by its Bernoulli(p) probability:
    E[(1/K) Σ (r_i - r̄)²] = p(1-p)(K-1)/K (the per-sample E[A²] with a group-mean baseline: the expected *biased*
    sample variance), E[(1/(K-1)) Σ (r_i - r̄)²] = p(1-p) (the unbiased one), and the expected number of
    samples in all-equal groups is K(p^K + (1-p)^K)."""
    biased = unbiased = waste = 0.0
    for r in itertools.product((0, 1), repeat=k):
        prob = math.prod(p if x else 1 - p for x in r)
        mean = sum(r) / k
        ss = sum((x - mean) ** 2 for x in r)
        biased += prob * ss / k
        unbiased += prob * ss / (k - 1)
        waste += prob * k * (len(set(r)) == 1)
    assert math.isclose(biased, signal(p, k), abs_tol=1e-12)
    assert math.isclose(unbiased, p * (1 - p), abs_tol=1e-12)
    assert math.isclose(waste, wasted(p, k), abs_tol=1e-12)


def test_wasted_fraction_and_degenerate_groups():
    assert wasted_fraction([0.0, 1.0, 0.5], 2) == pytest.approx((2 + 2 + 2 * 0.5) / 6)
    assert degenerate_fraction([[1, 1, 1], [0, 0, 0], [0, 1, 0], [1, 0, 1]]) == 0.5
    assert degenerate_fraction([]) == 0.0


# -- buckets and the band --------------------------------------------------------------------------------------
def test_bucket_edges_belong_to_the_training_pool():
    assert [bucket(p) for p in (0.0, 0.0499, 0.05, 0.5, 0.95, 0.9501, 1.0)] == \
        ["too_hard", "too_hard", "train", "train", "train", "too_easy", "too_easy"]
    assert [bucket(j / 8) for j in range(9)] == ["too_hard"] + ["train"] * 7 + ["too_easy"]
    assert [in_band(j / 8) for j in range(9)] == [False] + [True] * 7 + [False]
    assert [in_band(p, 0.125, 0.875) for p in (0.125, 0.25, 0.875)] == [False, True, False]


def test_wilson_interval_by_hand():
    z2 = Z95 ** 2
    # k = 0: the lower end is 0 and the upper z²/(n + z²); k = n mirrors it
    assert wilson(0, 8) == (0.0, pytest.approx(z2 / (8 + z2), abs=1e-15))
    assert wilson(8, 8) == (pytest.approx(8 / (8 + z2), abs=1e-15), 1.0)
    # k = n/2: centred on 1/2, half-width z·sqrt(1/(4n) + z²/(4n²)) / (1 + z²/n)
    lo, hi = wilson(4, 8)
    half = Z95 * math.sqrt(1 / 32 + z2 / 256) / (1 + z2 / 8)
    assert (lo, hi) == (pytest.approx(0.5 - half, abs=1e-15), pytest.approx(0.5 + half, abs=1e-15))
    # 1 success in 10: the textbook (Newcombe 1998, method 3) 0.0179 to 0.4042
    assert wilson(1, 10) == (pytest.approx(0.0179, abs=5e-5), pytest.approx(0.4042, abs=5e-5))
    assert wilson(0, 0) == (0.0, 1.0)


# -- normalisation, dedup ---------------------------------------------------------------------------------------
def test_normalise_whitespace_fractions_and_reordered_terms():
    assert normalise("What is  3/4 + 12 +\t7 ?") == normalise("what is 7 + 0.75 + 12?") == "what is 0.75 + 7 + 12 ?"
    assert normalise("<3+4+5>") == normalise("<5+3+4>") == "< 3 + 4 + 5 >"
    assert normalise("1/3 + 06") == "1/3 + 6"                  # 1/3 has no finite decimal: kept as a fraction
    assert normalise("2 - 3 + 4") != normalise("2 - 4 + 3")    # a chain after '-' is not commutative
    assert normalise("2 * 3 + 4") != normalise("3 + 2 * 4")


def _problem(rng: random.Random) -> tuple:
    n = rng.randint(3, 5)
    return tuple(sorted(rng.randint(0, 99) for _ in range(n))), rng.choice([(1, 4), (3, 4), (1, 2), (5, 8)])


TEMPLATES = ["What is {} ?", "Compute the sum {} and give the answer as a number.", "<{}>"]


def _text(terms: list[str], template: str, sep: str = " + ") -> str:
    return template.format(sep.join(terms))


def test_minhash_recall_on_paraphrases_and_precision_on_distinct_problems():
    rng = random.Random(0)
    problems = set()
    while len(problems) < 2000:
        problems.add(_problem(rng))
    problems = sorted(problems)
    originals, paraphrases = [], []
    for i, (ints, (a, b)) in enumerate(problems):
        tpl = TEMPLATES[i % len(TEMPLATES)]
        terms = [f"{a}/{b}", *map(str, ints)]
        originals.append(PromptRow(f"o{i}", _text(terms, tpl), "0"))
        if i < 300:   # a paraphrase: decimal for the fraction, terms shuffled, whitespace and case changed
            dec = [str(a / b), *map(str, ints)]
            rng.shuffle(dec)
            text = _text(dec, tpl, sep=rng.choice(["+", "  +  ", " +\t"]))
            paraphrases.append(PromptRow(f"p{i}", text.upper() if i % 2 else text.replace(" ", "  "), "0"))
    # precision: 2,000 distinct problems, (almost) none removed as a near-duplicate of another
    kept, removed = near_dedup(originals, threshold=0.8)
    assert len(removed) / len(originals) <= 0.01, [x.reason for x in removed[:5]]
    # recall: each paraphrase is found as a near-duplicate of its own original
    _, removed = near_dedup(originals + paraphrases, threshold=0.8)
    found = sum(x.row.id.startswith("p") and f"near-duplicate of o{x.row.id[1:]} " in x.reason for x in removed)
    assert found / len(paraphrases) >= 0.95


@pytest.mark.parametrize("max_operands,distinct", [(4, 624), (6, 1221)])
def test_minhash_precision_on_the_arithmetic_tasks_own_problems(max_operands, distinct):
    """2,000 draws of the task (2-4 operands, and the pipeline's 2-6), exact-deduped (a reordered sum is the same
    problem): no distinct sum is a near-duplicate of another at 0.8. Shingles count words, not symbols: counted as
    words, `+` made two 6-operand sums that differ in one term 0.82 alike, and ~10 % of the 2-6 set went."""
    from rlpt.gpt_mini.task import ArithmeticTask
    task, rng = ArithmeticTask(max_operands=max_operands), random.Random(0)
    rows, _ = exact_dedup([PromptRow(f"a{i}", task.sample(rng).prompt, "0") for i in range(2000)])
    kept, removed = near_dedup(rows, threshold=0.8)
    assert len(rows) == distinct and removed == [], [x.reason for x in removed[:3]]
    assert jaccard(shingles("<5+2+9+1+1+8>"), shingles("<5+2+9+1+1+9>")) == 1 / 3     # 2 of 4 word 3-grams shared


def test_exact_dedup_keeps_the_first_of_each_normalised_text():
    rows = [PromptRow("a", "<3+4>", "7"), PromptRow("b", "< 4 + 3 >", "7"), PromptRow("c", "<3+5>", "8")]
    kept, removed = exact_dedup(rows)
    assert [r.id for r in kept] == ["a", "c"] and [x.row.id for x in removed] == ["b"]
    assert "same normalised text as a" in removed[0].reason


# -- decontamination ---------------------------------------------------------------------------------------------
EVAL_TPL = "A farmer has {} apples and buys {} more baskets of {} kg each. How many kilograms does he carry home?"
TRAIN_TPL = "Sara reads {} pages on Monday, then {} pages each day for {} days. Find the total number of pages."


def test_decontamination_flags_every_injected_eval_row_and_nothing_disjoint():
    rng = random.Random(1)
    evals = [EVAL_TPL.format(rng.randint(1, 99), rng.randint(1, 99), f"{rng.randint(1, 9)}/4") for _ in range(100)]
    disjoint = [PromptRow(f"t{i}", TRAIN_TPL.format(rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 9)), "0")
                for i in range(500)]
    # injected: eval rows as they leak, re-spaced, re-cased, 3/4 written 0.75, inside a longer prompt
    injected = [PromptRow(f"e{i}", ("Q: " if i % 2 else "") + e.replace(" ", "  ").upper()
                          .replace("/4 KG", "/4 kg"), "0") for i, e in enumerate(evals)]
    index = EvalIndex((8, 13))
    index.add("farm", evals)
    index.add("arith", ["<3+4+5>"])
    kept, removed = decontaminate(disjoint + injected + [PromptRow("s1", "<5+3+4>", "12"),
                                                         PromptRow("s2", "<3+4+6>", "13")], index)
    assert sorted(x.row.id for x in removed) == sorted([r.id for r in injected] + ["s1"])
    assert {x.reason for x in removed if x.row.id.startswith("e")} == {"overlaps farm (8-gram), farm (13-gram)"}
    assert len(kept) == 501


def test_decontamination_counts_words_so_a_long_sum_matches_only_itself():
    """n counts words, not `+` and `<`: a 6-operand sum sharing the sorted run 3+4+5+6 with an eval sum is not a
    leak (as symbol-counted 8-grams had it), a reordering of the eval sum is, and a 9-word text is cut in words."""
    index = EvalIndex((8,))
    index.add("held", ["<1+3+4+5+6+9>", "one two three four five six seven eight nine"])
    rows = [PromptRow("run", "<2+3+4+5+6+7>", "27"), PromptRow("reorder", "<9+6+5+4+3+1>", "28"),
            PromptRow("words", "zero, two three four five six seven eight nine!", "0")]
    kept, removed = decontaminate(rows, index)
    assert [r.id for r in kept] == ["run"] and [x.row.id for x in removed] == ["reorder", "words"]
    assert ngrams("a + b c d", 3) == {("a", "+", "b", "c"), ("b", "c", "d")} and ngrams("<1+2>", 8) == {
        ("<", "1", "+", "2", ">")}


# -- reading prompt sets ------------------------------------------------------------------------------------------
def test_rows_defaults_and_bad_rows_name_file_and_line(tmp_path):
    good = tmp_path / "set.jsonl"
    good.write_text('{"prompt": "<3+4>", "answer": 7}\n\n{"id": "x", "prompt": "<1+1>", "answer": "2", '
                    '"source": "hand", "metadata": {"k": 1}}\n')
    assert read_jsonl(good) == [PromptRow("set-1", "<3+4>", "7", "set", {}), PromptRow("x", "<1+1>", "2", "hand",
                                                                                        {"k": 1})]
    cases = {'{"prompt": "<3+4>"}': "answer: Field required",
             '{"prompt": "<3+4>", "anwser": "7", "answer": "7"}': "anwser: unknown key",
             '{"prompt": "  ", "answer": "7"}': "the prompt is blank",
             '{"prompt": 3, "answer": "7"}': "prompt: Input should be a valid string",
             '["<3+4>", "7"]': "a prompt row must be a JSON object",
             '{"prompt": "<3+4>", "answer": "7"': "not JSON"}
    for line, want in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "<1+1>", "answer": "2"}\n' * 2 + line + "\n")
        with pytest.raises(ConfigError, match=want) as e:
            read_jsonl(bad)
        assert str(e.value).startswith(f"{bad}:3: ")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 5000}) + "\n")
    with pytest.raises(ConfigError) as e:
        read_jsonl(long)
    assert f"{long}:1: " in str(e.value) and len(str(e.value)) < 400 and "chars)" in str(e.value)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "prompt": "<1+1>", "answer": "2"}\n{"id": "1", "prompt": "<1+2>", "answer": "3"}\n')
    with pytest.raises(ConfigError, match="id '1' is used by two rows"):
        read_jsonl(dup)


def test_parquet_and_hf_say_what_to_install():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs pyarrow, which is not installed"):
            read_prompts("set.parquet")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs `datasets`, which is not installed"):
            read_prompts("hf:owner/name")


# -- the commands ----------------------------------------------------------------------------------------------
def test_make_arith_writes_distinct_prompts_of_one_split(tmp_path):
    from rlpt.gpt_mini.task import ArithmeticTask, parse_prompt
    out = tmp_path / "held.jsonl"
    assert main(["data", "make-arith", str(out), "--n", "40", "--split", "heldout", "task.max_operands=3"]) == 0
    rows = read_jsonl(out)
    task = ArithmeticTask(max_operands=3)
    assert len(rows) == len({r.prompt for r in rows}) == 40
    assert all(task.is_heldout(parse_prompt(r.prompt)) and int(r.answer) == parse_prompt(r.prompt).gold
               for r in rows)


@pytest.mark.slow
def test_curate_end_to_end_on_a_tiny_policy(tmp_path, tiny_job, capsys):
    """A tiny SFT policy (a few direct-answer steps: some prompts solved sometimes), then every stage."""
    from rlpt.sft import train_sft
    _, run, _ = train_sft(tiny_job("sft.steps=120", "task.max_operands=2", "sft.optim.lr=3e-3"))
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    assert main(["data", "make-arith", str(train), "--n", "120", "task.max_operands=2"]) == 0
    assert main(["data", "make-arith", str(held), "--n", "30", "--split", "heldout", "task.max_operands=2"]) == 0
    rows = read_jsonl(train)
    leaked = read_jsonl(held)[:3]
    extra = [PromptRow("leak-0", leaked[0].prompt, leaked[0].answer), PromptRow("no-int", "<9+9+9>", "twenty-seven"),
             PromptRow("negative", "<9+9+8>", "-26")]   # the verifier reads no sign: it rejects its own gold
    train.write_text(train.read_text() + "".join(r.to_json() + "\n" for r in extra))
    assert main(["data", "curate", str(train), "--policy", str(run.dir), "--eval", f"held={held}",
                 f"run.out_dir={tmp_path / 'runs'}", "difficulty.k=4", "difficulty.max_tokens=4"]) == 0
    folder = tmp_path / "runs" / "curate"
    report = (folder / "report.md").read_text()
    removed = [json.loads(x) for x in (folder / "removed.jsonl").read_text().splitlines()]
    rates = [json.loads(x) for x in (folder / "pass_rates.jsonl").read_text().splitlines()]
    curated = read_jsonl(folder / "curated.jsonl")
    stages = [x["stage"] for x in removed]
    why = {x["id"]: (x["stage"], x["reason"]) for x in removed}
    assert why["leak-0"] == ("decontaminate", "overlaps held (8-gram), held (13-gram)")
    assert why["no-int"] == ("answer check", "answer 'twenty-seven' is not what the int verifier reads")
    assert why["negative"] == ("answer check", "the verifier rejects the gold answer")
    # every row is either curated or removed once; the curated ones are those scored strictly inside (0, 1)
    assert len(curated) + len(removed) == len(rows) + len(extra)
    assert {r.id for r in curated} == {x["id"] for x in rates if 0 < x["successes"] < 4}
    assert all(r.metadata["k"] == 4 and 0 < r.metadata["p_hat"] < 1 for r in curated)
    assert stages.count("pass-rate band") == sum(x["successes"] in (0, 4) for x in rates)
    assert (folder / "pass_rate_hist.png").stat().st_size > 0 and "![pass rates](pass_rate_hist.png)" in report
    assert "| decontaminate |" in report and "Measured on" in report
    assert "pass-rate band" in capsys.readouterr().out
    cfg = (folder / "config.yaml").read_text()
    assert "policy:" in cfg and "held=" in cfg and "k: 4" in cfg


def test_curate_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "<1+1>"}\n')
    assert main(["data", "curate", str(bad), f"run.out_dir={tmp_path}"]) == 2
    assert f"rlpt data: error: {bad}:1: bad prompt row" in capsys.readouterr().err
    assert main(["data", "curate", str(bad), "difficulty.low=0.9", "difficulty.high=0.1"]) == 2
    assert "difficulty.low must be < difficulty.high" in capsys.readouterr().err


# -- the stratified mix (stage 6) ---------------------------------------------------------------------------------
def test_apportion_by_largest_remainder():
    from rlpt.data.curate import apportion
    assert apportion(10, {"a": 0.5, "b": 0.3, "c": 0.2}) == {"a": 5, "b": 3, "c": 2}
    assert apportion(7, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 3, "b": 2, "c": 2}   # a tie: the first
    assert apportion(5, {"a": 0.55, "b": 0.45}) == {"a": 3, "b": 2}         # 2.75 / 2.25: the larger remainder
    assert apportion(0, {"a": 1.0}) == {"a": 0}


def _mixed(n_a=30, n_b=10):
    return ([PromptRow(f"a{i}", f"<{i}+1>", str(i + 1), "a", {"ops": 2}) for i in range(n_a)] +
            [PromptRow(f"b{i}", f"<{i}+2>", str(i + 2), "b", {"ops": 3}) for i in range(n_b)])


def test_stratified_mix_meets_the_target_shares_without_repeating_a_row():
    from rlpt.data.curate import stratified_mix
    rows = _mixed()
    kept, removed, counts = stratified_mix(rows, ["source"], {"a": 0.5, "b": 0.5})
    # N = min(30 / 0.5, 10 / 0.5) = 20: 10 of each; b's 10 all kept
    assert counts == [{"stratum": "a", "available": 30, "share": 0.5, "wanted": 10, "kept": 10},
                      {"stratum": "b", "available": 10, "share": 0.5, "wanted": 10, "kept": 10}]
    assert len(kept) == 20 and [r.source for r in kept].count("a") == 10 and len(removed) == 20
    assert kept == sorted(kept, key=rows.index)                                    # input order
    assert removed[0].reason == "stratum a: 10 of 30 kept for a share of 0.500"
    assert stratified_mix(rows, ["source"], {"a": 0.5, "b": 0.5}, seed=1)[0] != kept   # the seed picks the rows
    assert stratified_mix(rows, ["source"], {"a": 0.5, "b": 0.5})[0] == kept
    # 0.7 / 0.3: N = min(30 / 0.7, 10 / 0.3) = min(42.86, 33.33) = 33 -> 23.1 / 9.9 -> 23 / 10
    assert [c["kept"] for c in stratified_mix(rows, ["source"], {"a": 0.7, "b": 0.3})[2]] == [23, 10]
    # a size the strata cannot fill: b keeps all 10 of its 20 wanted, nothing is repeated
    _, _, counts = stratified_mix(rows, ["source"], {}, size=40)                   # no targets: equal shares
    assert [(c["wanted"], c["kept"]) for c in counts] == [(20, 20), (20, 10)]
    # a stratum without a share goes; two keys join with '/'
    kept, _, counts = stratified_mix(rows, ["source", "ops"], {"a/2": 1.0})
    assert [c["stratum"] for c in counts] == ["a/2", "b/3"] and len(kept) == 30 and counts[1]["kept"] == 0


def test_stratified_mix_by_difficulty_and_its_errors():
    from rlpt.data.curate import MixConfig, stratified_mix
    rows = [PromptRow(f"r{i}", f"<{i}+1>", str(i + 1), "s", {"p_hat": p, "k": 8})
            for i, p in enumerate([0.125, 0.125, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0])]
    _, _, counts = stratified_mix(rows, ["p_hat"], {"1/8": 0.5, "4/8": 0.5})
    assert [(c["stratum"], c["kept"]) for c in counts] == [("1/8", 2), ("4/8", 2), ("8/8", 0), ("0/8", 0)]
    _, _, counts = stratified_mix(rows, ["bucket"], {"train": 0.75, "too_easy": 0.25})
    assert [(c["stratum"], c["available"], c["kept"]) for c in counts] == \
        [("train", 6, 3), ("too_easy", 1, 1), ("too_hard", 1, 0)]
    with pytest.raises(ConfigError, match="mix.targets names 'x', which no row is in"):
        stratified_mix(rows, ["source"], {"x": 1.0})
    with pytest.raises(ConfigError, match="mix.by=bucket needs each row's pass rate, but row 'a0' has none"):
        stratified_mix(_mixed(), ["bucket"], {})
    with pytest.raises(ConfigError, match="row 'a0' has no metadata key 'level'"):
        stratified_mix(_mixed(), ["level"], {})
    with pytest.raises(ConfigError, match="shares >= 0"):
        stratified_mix(_mixed(), ["source"], {"a": -1.0, "b": 2.0})
    with pytest.raises(ValueError, match="mix.by is empty"):
        MixConfig(targets={"a": 1.0})


def test_curate_reports_the_mix_counts(tmp_path, capsys):
    from rlpt.data.prompts import write_prompts
    src = write_prompts(tmp_path / "mixed.jsonl", _mixed())
    assert main(["data", "curate", str(src), f"run.out_dir={tmp_path}", "mix.by=[source]", "mix.targets.a=0.75",
                 "mix.targets.b=0.25"]) == 0
    printed = capsys.readouterr().out
    assert "stratified mix" in printed and "39 -> 36" in printed
    folder = tmp_path / "curate"
    report = (folder / "report.md").read_text()
    # exact dedup drops b1 '<1+2>' (= a2 '<2+1>'), so b has 9: N = min(30 / 0.75, 9 / 0.25) = 36 -> 27 + 9
    assert "| stratified mix | 39 | 36 | 3 | by source, a 27, b 9 |" in report
    assert "| a | 30 | 0.750 | 27 | 27 |" in report and "| b | 9 | 0.250 | 9 | 9 |" in report
    assert main(["data", "curate", str(src), f"run.out_dir={tmp_path}", "run.name=small", "mix.by=[source]",
                 "mix.size=8"]) == 0
    assert len(read_jsonl(tmp_path / "small" / "curated.jsonl")) == 8     # equal shares: 4 + 4
    removed = [json.loads(x) for x in (tmp_path / "small" / "removed.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in removed].count("stratified mix") == 31


# -- the online curriculum -------------------------------------------------------------------------------------
def test_curriculum_pass_rates_weights_and_floor():
    from rlpt.data.curriculum import Curriculum
    c = Curriculum(["a", "b", "c"], floor=0.01)
    assert [c.p_hat(x) for x in "abc"] == [0.5] * 3 and c.weight("a") == 0.25
    c.update([("a", [1, 1, 1, 1]), ("b", [0, 1, 0, 0])])
    assert c.p_hat("a") == 5 / 6 and c.weight("a") == pytest.approx(5 / 36, abs=1e-15)
    assert c.p_hat("b") == 2 / 6 and c.p_hat("c") == 0.5
    c.update([("a", [1] * 96)])                         # p̂ = 101/102: p(1-p) = 0.0097 < the floor
    assert c.p_hat("a") == 101 / 102 and c.weight("a") == 0.01
    d = Curriculum(["x"], decay=0.5)
    d.update([("x", [1, 1])])
    d.update([("x", [0, 0])])                           # s = 0.5·2 + 0 = 1, n = 0.5·2 + 2 = 3
    assert d.p_hat("x") == (1 + 1) / (3 + 2)


def test_curriculum_samples_by_weight_and_resumes_bit_identically():
    from rlpt.data.curriculum import Curriculum
    c = Curriculum(["a", "b", "c"], floor=0.01, seed=3)
    c.update([("a", [1] * 100), ("b", [1, 1, 1, 1])])   # weights 0.01, 5/36, 0.25
    assert sorted(c.sample(5)) == ["a", "b", "c"] and len(set(c.sample(2))) == 2
    firsts = [c.sample(1)[0] for _ in range(6000)]
    w = {"a": 0.01, "b": 5 / 36, "c": 0.25}
    for x, wx in w.items():
        p = wx / sum(w.values())
        assert abs(firsts.count(x) / 6000 - p) < 4 * math.sqrt(p * (1 - p) / 6000), x
    saved = json.loads(json.dumps(c.state_dict(), default=list))   # what a checkpoint would hold, through JSON
    saved["rng"] = (saved["rng"][0], tuple(saved["rng"][1]), saved["rng"][2])
    after = [c.sample(2) for _ in range(5)]
    r = Curriculum(["a", "b", "c"], floor=0.01, seed=99)
    r.load_state_dict(saved)
    assert [r.sample(2) for _ in range(5)] == after
    with pytest.raises(ValueError, match="saved prompt ids differ"):
        Curriculum(["a", "b"]).load_state_dict(saved)


def test_band_ceiling_reads_the_band_on_one_measurement_and_the_degenerate_fraction_on_the_other():
    """bench/band_ceiling.py's table by hand: the band on the first K samples, degeneracy (0 or K of K) on the
    second."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "bench" / "band_ceiling.py"
    spec = importlib.util.spec_from_file_location("band_ceiling", path)
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    table = {r["band"]: r for r in bc.ceiling([0, 4, 8, 3, 5, 1], [0, 4, 8, 8, 2, 0], 8)}
    assert {b: (r["rows"], r["degenerate_second"]) for b, r in table.items()} == {
        "none": (6, 4 / 6), "1..7 of 8": (4, 0.5), "2..6 of 8": (3, 1 / 3), "3..5 of 8": (3, 1 / 3),
        "4..4 of 8": (1, 0.0)}
    assert table["4..4 of 8"]["expected_first"] == 2 * 0.5 ** 8
    p8 = {a: (a / 8) ** 8 + (1 - a / 8) ** 8 for a in range(9)}
    assert table["none"]["expected_first"] == pytest.approx(sum(p8[a] for a in [0, 4, 8, 3, 5, 1]) / 6, abs=1e-15)
