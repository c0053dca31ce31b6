"""`rlpt export`: a gpt_mini run folder becomes a HF directory that `transformers` loads as is and that
greedy-generates the same tokens as rlpt. Everything local (a checkpoint written here, no hub)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from rlpt.checkpoint import save_step  # noqa: E402
from rlpt.cli import main  # noqa: E402
from rlpt.engine.naive import naive_greedy  # noqa: E402
from rlpt.gpt_mini.tokenizer import ALPHABET  # noqa: E402
from rlpt.models.export import char_tokenizer_to_hf, export_checkpoint  # noqa: E402

from conftest import TOK, tiny_gpt  # noqa: E402

PROMPTS = ["<3+4>", "<12+7+9>", "(1+2)*3=", "let me compute c(5+6)"]


@pytest.fixture
def run_dir(tmp_path):
    """A run folder holding one checkpoint of a peaked tiny gpt_mini (GQA 2/1, tied head, non-unit norms)."""
    gpt = tiny_gpt(seed=3, std=0.3, norm_std=0.2)
    save_step(tmp_path / "run" / "checkpoints", 7, gpt, gpt.cfg.to_dict(), {}, keep=1)
    return tmp_path / "run", gpt


def test_char_tokenizer_to_hf_same_ids_and_text():
    hf = char_tokenizer_to_hf()
    text = "let me compute c(123+456+789)# 0.75 <3+4>7#"
    assert hf.encode(text, add_special_tokens=False) == TOK.encode(text)
    assert hf.decode(TOK.encode(text)) == text
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (TOK.eos_id, TOK.pad_id, len(ALPHABET))
    assert hf.decode([TOK.pad_id] + TOK.encode("3#"), skip_special_tokens=True) == "3"
    with pytest.raises(Exception, match="UNK"):   # an unknown character is an error, never a silent pad  # noqa: B017
        hf.encode("3$4", add_special_tokens=False)


def test_export_loads_in_transformers_and_generates_like_rlpt(run_dir, tmp_path):
    run, gpt = run_dir
    out = tmp_path / "hf"
    summary = export_checkpoint(run, out)
    assert summary["step"] == 7 and summary["max_abs_logit_gap"] < 1e-5
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "rlpt_export.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "rlpt_export.json").read_text())["source_checkpoint"].endswith("step_00000007")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings
    assert (model.config.num_key_value_heads, model.config.eos_token_id) == (1, TOK.eos_id)
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        assert ids[0].tolist() == TOK.encode(prompt)
        n = 12
        ours, _ = naive_greedy(gpt, TOK.encode(prompt), n, TOK.eos_id)
        with torch.no_grad():
            hf_out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=TOK.eos_id,
                                    pad_token_id=TOK.pad_id)[0, ids.shape[1]:].tolist()
        assert hf_out[:len(ours)] == ours, prompt            # HF pads after EOS within a batch of one: none here
        assert tok.decode(hf_out, skip_special_tokens=False) == TOK.decode(ours)


def test_cli_export_and_bad_input(run_dir, tmp_path, capsys):
    run, _ = run_dir
    out = tmp_path / "cli_out"
    assert main(["export", str(run), str(out)]) == 0
    assert "max |Δlogit|" in capsys.readouterr().out
    assert main(["export", str(run), str(out)]) == 2                     # non-empty, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(run), str(out), "--force"]) == 0
    no_run = tmp_path / "not_a_run"
    no_run.mkdir()
    assert main(["export", str(no_run), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "not_a_run" in err and "run folder" in err
    assert not (tmp_path / "o2").exists()                                # nothing written on an error


def test_export_served_by_the_engine_like_the_gpt_mini_it_came_from(run_dir, tmp_path):
    from rlpt.engine import LLM, SamplingParams
    from rlpt.models.hf import load_hf_policy
    run, gpt = run_dir
    export_checkpoint(run, tmp_path / "hf")
    policy = load_hf_policy(tmp_path / "hf")                       # HFPolicy + the exported tokenizer
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=0)
    ours = LLM(gpt, TOK).generate(PROMPTS, sp)
    theirs = LLM(policy, policy.tokenizer).generate(PROMPTS, sp)
    for a, b in zip(ours, theirs):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids and x.text == y.text
            torch.testing.assert_close(torch.tensor(x.token_logprobs), torch.tensor(y.token_logprobs),
                                       atol=1e-5, rtol=0)
