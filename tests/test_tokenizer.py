"""The character tokenizer: exact round trips, clear errors, pad dropped on decode."""
from __future__ import annotations

import random

import pytest

from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.gpt_mini.tokenizer import ALPHABET, EOS, PAD, CharTokenizer, UnknownCharacterError


def test_ids_are_fixed():
    tok = CharTokenizer()
    assert tok.vocab_size == len(ALPHABET) == 50
    assert tok.pad_id == 0 and tok.decode([tok.pad_id]) == ""
    assert tok.alphabet[tok.eos_id] == EOS == "#"
    assert tok.encode("0") == [1] and tok.encode("9") == [10]


def test_round_trip_full_alphabet():
    tok = CharTokenizer()
    text = ALPHABET.replace(PAD, "")
    ids = tok.encode(text)
    assert ids == list(range(1, len(ALPHABET)))
    assert tok.decode(ids) == text
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice(text) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok.encode(s)) == s


def test_round_trip_task_text():
    tok, task, rng = CharTokenizer(), ArithmeticTask(max_value=99), random.Random(1)
    for _ in range(300):
        p = task.sample(rng)
        for text in (p.prompt, p.direct(), p.cot(), p.prompt + p.cot()):
            assert tok.decode(tok.encode(text)) == text
            assert len(tok.encode(text)) == len(text)


def test_unknown_character_names_char_and_position():
    tok = CharTokenizer()
    with pytest.raises(UnknownCharacterError) as e:
        tok.encode("<3+X>")
    msg = str(e.value)
    assert "'X'" in msg and "position 3" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownCharacterError, match=r"'A' \(position 0"):
        tok.encode("Abc")
    with pytest.raises(UnknownCharacterError, match="position 5"):
        tok.encode("12+34!5")   # first unknown character, reported by where it is


def test_decode_drops_pad():
    tok = CharTokenizer()
    ids = tok.encode("<3+4>")
    assert tok.decode([tok.pad_id] * 3 + ids + [tok.pad_id] * 2) == "<3+4>"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("bad", [-1, 50, 1000])
def test_decode_bad_id(bad):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        tok.decode([1, bad])


def test_repeated_alphabet_rejected():
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("\x00aa")
