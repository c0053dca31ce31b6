"""The character tokenizer of the arithmetic language: one character, one token.

    encode("<3+4+5>12#") == [ids of '<', '3', '+', ...];  decode(encode(s)) == s

The alphabet is the lessons' (digits, `< > + = , c ( )`, space, `#` end-of-turn) plus `- * /` for
the calculator tool's expressions, then the other lowercase letters and `.` (appended, so older ids
stay) for the multi-turn example `let me compute c(123+456+789)#` and math answers like `0.75`,
and a pad token that no text contains. Ids are fixed forever:
a checkpoint trained today decodes the same way tomorrow.
"""
from __future__ import annotations

PAD = "\x00"   # never appears in text; decode() drops it
EOS = "#"      # end of turn: the policy stops here and the EOS token itself is trained (mask 1)
ALPHABET = PAD + "0123456789<>+=,c() #-*/" + "abdefghijklmnopqrstuvwxyz."


class UnknownCharacterError(ValueError):
    pass


class CharTokenizer:
    def __init__(self, alphabet: str = ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("tokenizer alphabet has repeated characters")
        self.alphabet = alphabet
        self.stoi = {ch: i for i, ch in enumerate(alphabet)}
        self.pad_id = self.stoi[PAD]
        self.eos_id = self.stoi[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            ch = e.args[0]
            pos = text.index(ch)
            raise UnknownCharacterError(
                f"character {ch!r} (position {pos} of {text!r}) is not in the arithmetic alphabet "
                f"{self.alphabet[1:]!r}; remove it or extend rlpt.gpt_mini.tokenizer.ALPHABET") from None

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.alphabet):
                raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self.alphabet) - 1})")
            if i != self.pad_id:
                out.append(self.alphabet[i])
        return "".join(out)
