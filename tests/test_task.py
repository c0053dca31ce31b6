"""The arithmetic task: seeded sampling, a disjoint train / held-out split, formats, the verifier."""
from __future__ import annotations

import itertools
import random

import pytest

from rlpt.gpt_mini.task import ArithmeticTask, Problem, last_integer, parse_prompt, verify


def test_same_seed_same_problems():
    task = ArithmeticTask()
    r1, r2 = random.Random(7), random.Random(7)
    a = [task.sample(r1, s) for s in ["train", "heldout"] * 50]
    b = [task.sample(r2, s) for s in ["train", "heldout"] * 50]
    assert a == b
    c = [task.sample(random.Random(8)) for _ in range(50)]
    assert c != a[::2]


def test_split_partitions_small_space():
    """2 operands 0..9: 100 problems. is_heldout partitions them, and training never draws a held-out one."""
    task = ArithmeticTask(min_operands=2, max_operands=2, min_value=0, max_value=9, heldout_frac=0.2)
    space = [Problem(ops) for ops in itertools.product(range(10), repeat=2)]
    assert len(space) == task.num_distinct == 100
    held = {p for p in space if task.is_heldout(p)}
    train = {p for p in space if not task.is_heldout(p)}
    assert held and train and held.isdisjoint(train) and len(held) + len(train) == 100
    assert 5 <= len(held) <= 40            # about heldout_frac of the space
    rng = random.Random(0)
    drawn_train = {task.sample(rng, "train") for _ in range(5000)}
    drawn_held = {task.sample(rng, "heldout") for _ in range(2000)}
    assert drawn_train == train            # every train problem reachable, no held-out one ever
    assert drawn_held == held
    # the split is a pure function of the prompt: a fresh task object agrees
    again = ArithmeticTask(min_operands=2, max_operands=2, heldout_frac=0.2)
    assert {p for p in space if again.is_heldout(p)} == held
    other = ArithmeticTask(min_operands=2, max_operands=2, heldout_frac=0.2, split_seed=1)
    assert {p for p in space if other.is_heldout(p)} != held


def test_sample_bad_split():
    with pytest.raises(KeyError):
        ArithmeticTask().sample(random.Random(0), "test")


def test_heldout_set_distinct_and_deterministic():
    task = ArithmeticTask()
    a, b = task.heldout_set(200), task.heldout_set(200)
    assert a == b and len(a) == 200 and len(set(a)) == 200
    assert all(task.is_heldout(p) for p in a)
    assert task.heldout_set(200, seed=1) != a
    small = ArithmeticTask(min_operands=2, max_operands=2, heldout_frac=0.2)
    n_held = sum(small.is_heldout(Problem(ops)) for ops in itertools.product(range(10), repeat=2))
    got = small.heldout_set(n_held + 5)   # asks for more than exist: returns all of them, once each
    assert len(got) == len(set(got)) == n_held


def test_formats():
    p = parse_prompt("<3+4+5>")
    assert p == Problem((3, 4, 5)) and p.prompt == "<3+4+5>" and p.gold == 12
    assert p.direct() == p.response("direct") == "12#"
    assert p.cot() == p.response("cot") == "3+4=7,7+5=12#"
    assert Problem((9, 9)).cot() == "9+9=18#"
    assert Problem((5,)).cot() == "5#"   # one operand: nothing to add, the answer alone
    with pytest.raises(ValueError, match="unknown response format 'json'"):
        p.response("json")
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        parse_prompt("3+4")


def test_cot_last_integer_is_gold():
    task, rng = ArithmeticTask(min_operands=1, max_operands=6, max_value=99), random.Random(3)
    for _ in range(500):
        p = task.sample(rng)
        assert parse_prompt(p.prompt) == p
        assert last_integer(p.cot()) == p.gold == last_integer(p.direct())
        assert verify(p.cot(), p.gold) == verify(p.direct(), p.gold) == 1.0


@pytest.mark.parametrize("response,reward", [
    ("12#", 1.0),
    ("let me think... 12#", 1.0),
    ("11#", 0.0),
    ("120#", 0.0),
    ("no digits here#", 0.0),
    ("#", 0.0),
    ("", 0.0),
    ("let me think 3+4=7, 7+5=12, so 12#", 1.0),
    ("3+4=7,7+5=12#", 1.0),
    ("12 or 13#", 0.0),
])
def test_verify_fixtures(response, reward):
    # verify works on text: the tokenizer could not encode the letters, the verifier does not care
    assert verify(response, 12) == reward


def test_config_errors():
    with pytest.raises(ValueError, match="min_operands"):
        ArithmeticTask(min_operands=3, max_operands=2)
    with pytest.raises(ValueError, match="min_value"):
        ArithmeticTask(min_value=5, max_value=2)


def test_no_heldout_problem_has_a_reordered_twin_in_training():
    """The split hashes the sorted operands, so every ordering of a held-out multiset is held out. Over the default
    task's whole space (2-4 operands of 0..9: 11,100 problems) and its 500-problem held-out set."""
    task = ArithmeticTask()
    space = [Problem(ops) for n in (2, 3, 4) for ops in itertools.product(range(10), repeat=n)]
    assert len(space) == task.num_distinct == 11_100
    by_multiset: dict[tuple[int, ...], set[bool]] = {}
    for p in space:
        by_multiset.setdefault(tuple(sorted(p.operands)), set()).add(task.is_heldout(p))
    assert all(len(sides) == 1 for sides in by_multiset.values())      # one side per multiset
    held = [k for k, sides in by_multiset.items() if sides == {True}]
    assert 0.05 * len(by_multiset) <= len(held) <= 0.15 * len(by_multiset)   # about heldout_frac of the multisets
    for p in task.heldout_set(500):
        twins = {Problem(ops) for ops in itertools.permutations(p.operands)}
        assert not any(not task.is_heldout(t) for t in twins), p
    assert task.is_heldout(Problem((4, 3, 9))) == task.is_heldout(Problem((9, 4, 3)))
