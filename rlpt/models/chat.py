"""A Hugging Face tokenizer as the env's and the rollout's tokenizer, prompts optionally through its chat template.

    tok = PromptTokenizer(hf_tokenizer, chat_template=True, system="Reason step by step.")
    tok.encode_prompt("What is 3+4?")   # == apply_chat_template([system, user], add_generation_prompt=True)
    tok.decode(response_ids)            # plain decode, special tokens kept (EOS included, as CharTokenizer does)

chat_template=False: a prompt is `hf_tokenizer.encode(text)` with the tokenizer's own special tokens (a Llama's
BOS: what a base model saw in pre-training). eos_id / pad_id are the tokenizer's (pad = EOS when it has none).
An env asks for `encode_prompt` when its tokenizer has one (rlpt/envs/math_answer.py), `encode` otherwise.
"""
from __future__ import annotations

from rlpt.models.hf import HFTokenizerAdapter


class PromptTokenizer(HFTokenizerAdapter):
    """HFTokenizerAdapter plus `encode_prompt`: the ids the policy sees for a user message."""

    def __init__(self, tokenizer, chat_template: bool = False, system: str | None = None):
        super().__init__(getattr(tokenizer, "tok", tokenizer), stop_ids=getattr(tokenizer, "stop_ids", None))
        if chat_template and not getattr(self.tok, "chat_template", None):
            raise ValueError(f"data.chat_template=true but the tokenizer {getattr(self.tok, 'name_or_path', '')!r} "
                             "has no chat_template (a base model): set data.chat_template=false, or add one to its "
                             "tokenizer_config.json / chat_template.jinja")
        if system is not None and not chat_template:
            raise ValueError("data.system is a system message for the chat template: set data.chat_template=true "
                             "or remove data.system")
        self.chat_template = chat_template
        self.system = system

    def messages(self, text: str, system: str | None = None) -> list[dict]:
        """The chat: the system message (`system`, a row's own, else data.system's) and the user's `text`."""
        system = system if system is not None else self.system
        sys = [{"role": "system", "content": system}] if system is not None else []
        return [*sys, {"role": "user", "content": text}]

    def encode_prompt(self, text: str, system: str | None = None) -> list[int]:
        if not self.chat_template:
            if system is not None:
                raise ValueError(f"a prompt with its own system message ({system[:60]!r}) needs "
                                 "data.chat_template=true: plain encoding has nowhere to put it")
            return list(self.tok.encode(text))
        ids = self.tok.apply_chat_template(self.messages(text, system), add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        return [int(i) for i in ids]
