"""rlpt.models.hf: gpt_mini <-> Llama conversion parity, and HFPolicy behind generate().

Everything is built locally (random tiny configs, a character tokenizer made with `tokenizers`):
no hub access. Tolerances are fp32-exact (1e-5).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from rlpt.gpt_mini.generate import SamplingParams, generate  # noqa: E402
from rlpt.gpt_mini.model import GPT, GPTConfig  # noqa: E402
from rlpt.gpt_mini.tokenizer import ALPHABET, CharTokenizer  # noqa: E402
from rlpt.models.hf import HFPolicy, gpt_config_from_hf, gpt_mini_to_hf, hf_to_gpt_mini, load_hf_policy  # noqa: E402

ATOL = 1e-5


def _sharpen(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Re-init weights with a large std: peaked logits make greedy argmax immune to 1e-7 noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _gpt(n_kv_head=4, tie=True, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=24, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, d_ff=64,
                    max_seq_len=32, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie)
    gpt = GPT(cfg)
    with torch.no_grad():   # non-unit norm weights, so a swapped norm mapping would show
        for name, p in gpt.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return gpt.eval()


def _llama_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=30, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaConfig(**{**base, **kw})


CASES = [(4, True), (4, False), (2, True), (1, False)]    # (n_kv_head, tied): MHA, GQA, MQA


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("n_kv_head,tie", CASES)
def test_gpt_mini_to_hf_logits_match(n_kv_head, tie, impl):
    gpt = _gpt(n_kv_head, tie)
    hf = gpt_mini_to_hf(gpt, attn_implementation=impl)
    assert hf.config.num_key_value_heads == n_kv_head and hf.config.tie_word_embeddings == tie
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 24, (3, 32))                                   # (B, T): full max_seq_len
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_kv_head,tie", CASES)
def test_hf_to_gpt_mini_logits_match(n_kv_head, tie):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(_llama_config(num_key_value_heads=n_kv_head, tie_word_embeddings=tie)).eval()
    gpt = hf_to_gpt_mini(hf)
    assert gpt.cfg.n_kv_head == n_kv_head and gpt.cfg.tie_embeddings == tie
    ids = torch.randint(0, 30, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(gpt(ids), hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_kv_head,tie", CASES)
def test_round_trip_state_dict_identical(n_kv_head, tie):
    gpt = _gpt(n_kv_head, tie)
    back = hf_to_gpt_mini(gpt_mini_to_hf(gpt))
    assert back.cfg == gpt.cfg
    a, b = gpt.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("overrides,field", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), "rope"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
    (dict(attention_dropout=0.1), "attention_dropout"),
])
def test_unrepresentable_config_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        gpt_config_from_hf(_llama_config(**overrides))


def test_non_llama_config_names_model_type():
    cfg = transformers.MistralConfig(vocab_size=30, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="model_type"):
        gpt_config_from_hf(cfg)


def test_unrepresentable_model_raises_on_conversion():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="attention_bias"):
        hf_to_gpt_mini(LlamaForCausalLM(_llama_config(attention_bias=True)))


# ---- HFPolicy ---------------------------------------------------------------------------------------

def _char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer over gpt_mini's alphabet: `<pad>` instead of NUL, `#` as EOS."""
    vocab = {"<pad>": 0, **{ch: i for i, ch in enumerate(ALPHABET) if i > 0}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")   # one char, one token
    tok.decoder = decoders.Fuse()                                               # join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="#", pad_token="<pad>")


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    tok = _char_tokenizer()
    torch.manual_seed(0)
    cfg = _llama_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = LlamaForCausalLM(cfg)
    _sharpen(hf)
    d = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def policy(saved_dir):
    return load_hf_policy(saved_dir)


PROMPTS = ["3+4=", "<12+7+9>", "5", "(1+2)*3="]


def test_policy_forward_and_tokenizer(policy, saved_dir):
    tok = policy.tokenizer
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (CharTokenizer().eos_id, 0, len(ALPHABET))
    assert tok.encode("3+4=7#") == CharTokenizer().encode("3+4=7#")
    assert tok.decode(tok.encode("<3+4>7#") + [tok.pad_id]) == "<3+4>7#"
    assert policy.cfg.max_seq_len == 48
    ids = torch.tensor([tok.encode("(1+2)*3=9#")])
    out = policy(ids)
    assert isinstance(out, torch.Tensor) and out.shape == (1, ids.shape[1], len(ALPHABET))
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(saved_dir, local_files_only=True, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(out.detach(), ref, atol=ATOL, rtol=0)


def test_policy_cached_chunks_match_full_forward(policy):
    ids = torch.tensor([policy.tokenizer.encode("<12+7+9>28#")])          # (1, T)
    with torch.no_grad():
        full = policy(ids)
        cache = policy.new_cache(1)
        parts = [policy(ids[:, :5], cache=cache), policy(ids[:, 5:7], cache=cache)]
        parts += [policy(ids[:, t:t + 1], cache=cache) for t in range(7, ids.shape[1])]
    # this fixture's weights are scaled up (logits in the tens), so fp32 rounding of HF's cached vs
    # uncached kernels shows at ~1e-5 absolute: hold it to 1e-5 relative as well
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=1e-5)


def test_policy_greedy_batch_equals_per_row(policy):
    tok, sp = policy.tokenizer, SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [tok.encode(p) for p in PROMPTS]                             # lengths differ: left padding
    batch = generate(policy, prompts, sp, tok.eos_id, tok.pad_id)
    for p, s in zip(prompts, batch):
        (alone,) = generate(policy, [p], sp, tok.eos_id, tok.pad_id)
        assert s.tokens == alone.tokens and s.finish_reason == alone.finish_reason
        torch.testing.assert_close(torch.tensor(s.logps), torch.tensor(alone.logps), atol=ATOL, rtol=0)


def test_policy_sampled_logps_match_full_forward(policy):
    tok = policy.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    samples = generate(policy, prompts, SamplingParams(max_tokens=16, temperature=1.0), tok.eos_id, tok.pad_id, g)
    assert any(len(s.tokens) > 1 for s in samples)
    for p, s in zip(prompts, samples):
        seq = torch.tensor([p + s.tokens])                                 # (1, P + R), no padding
        with torch.no_grad():
            logp = torch.log_softmax(policy(seq)[0].float(), dim=-1)       # (P + R, V)
        ref = logp[len(p) - 1:-1].gather(-1, torch.tensor(s.tokens)[:, None]).squeeze(-1)   # (R,)
        torch.testing.assert_close(torch.tensor(s.logps), ref, atol=ATOL, rtol=0)


def test_converted_policy_generates_like_gpt_mini():
    gpt = _gpt(n_kv_head=2, tie=True)
    _sharpen(gpt, seed=1)
    policy = HFPolicy(gpt_mini_to_hf(gpt))
    ct, sp = CharTokenizer(), SamplingParams(max_tokens=10, temperature=0.0)
    prompts = [ct.encode(p) for p in PROMPTS]
    ours = generate(policy, prompts, sp, ct.eos_id, ct.pad_id)
    ref = generate(gpt, prompts, sp, ct.eos_id, ct.pad_id)
    for a, b in zip(ours, ref):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logps), torch.tensor(b.logps), atol=ATOL, rtol=0)


def test_load_hf_policy_missing_or_not_a_model_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_hf_policy(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        load_hf_policy(empty)
