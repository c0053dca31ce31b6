"""Your own model and data: GSM8K / MATH loaders, and `rlpt train model.hf_path=<dir> env.name=math data.prompts=...`
on a Hugging Face model with ITS OWN tokenizer and chat template (not gpt_mini's characters).

The model is built here: a random tiny Qwen2 (q/k/v biases, tied embeddings) or Llama, and a byte-level BPE
tokenizer trained on a few hundred generated lines, wrapped as PreTrainedTokenizerFast with eos/pad and a ChatML
jinja chat template. The vocabulary is small (64) with the ten digits single tokens and the golds are one digit, so
a random policy is right several times in a hundred and GRPO groups are mixed (steps train, the log-prob check
runs). transformers loads a qwen2 directory's tokenizer as Qwen2Tokenizer (rebuilt from vocab and merges), a
llama one as saved: both are covered."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from rlpt.config import ConfigError  # noqa: E402
from rlpt.data.formats import gsm8k_row, last_boxed, read_prompt_set  # noqa: E402
from rlpt.envs.format_reward import FormatEnv  # noqa: E402
from rlpt.framework.environment import Prompt  # noqa: E402
from rlpt.train import build, env_model_kwargs, load_train_job, run_train  # noqa: E402

NAMES = ["Tom", "Ann", "Bob", "Eve"]
THINGS = ["apples", "pens", "cats", "books"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _question(rng: random.Random) -> tuple[str, int, int]:
    a, b = rng.randint(0, 4), rng.randint(0, 5)
    return f"{rng.choice(NAMES)} has {a} {rng.choice(THINGS)} and gets {b} more. How many now?", a, b


def _tokenizer(rng: random.Random):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    lines = [f"{_question(rng)[0]}\nThe answer is {rng.randint(0, 9)}.\nsystem user assistant" for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=64, special_tokens=special))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                 additional_special_tokens=special[2:])
    hf.chat_template = CHAT
    return hf


def _save(root: Path, arch: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    tok = _tokenizer(random.Random(0))
    shape = dict(vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and model.lm_head.weight is model.model.embed_tokens.weight
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    d = root / arch
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_model")
    return {arch: _save(root, arch) for arch in ("qwen2", "llama")}


def _gsm8k_file(path: Path, n: int = 16) -> Path:
    rng = random.Random(1)
    rows = {}
    while len(rows) < n:   # distinct questions: the held-out ones are never trained on
        q, a, b = _question(rng)
        rows[q] = {"question": q, "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
    rows = list(rows.values())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAST = ["rollout.k=8", "rollout.prompts_per_step=8", "rollout.max_tokens=8", "eval.every=100", "eval.size=8",
        "run.progress=false", "trainer.optim.lr=1e-3", "env.name=math", "data.format=gsm8k", "data.heldout=0.25",
        "steps=2", "ckpt_every=1"]


def _job(tmp_path, hf_dir, *overrides):
    data = _gsm8k_file(tmp_path / "gsm8k.jsonl")
    return load_train_job(None, [*FAST, f"run.out_dir={tmp_path / 'runs'}", f"model.hf_path={hf_dir}",
                                 f"data.prompts={data}", *overrides])


def _metrics(run) -> list[dict]:
    return [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]


# -- loaders -------------------------------------------------------------------------------------------------
def test_gsm8k_rows_take_the_text_after_hashes_without_commas(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": " Sum? ", "answer": "Half of 2,400 is <<2400/2=1200>>1,200.\n#### 1,200"})
                 + "\n\n" + json.dumps({"question": "Neg?", "answer": "so\n####  -3 "}) + "\n")
    a, b = read_prompt_set(str(f), "gsm8k")
    assert (a.id, a.prompt, a.answer, a.source) == ("gsm-1", "Sum?", "1200", "gsm")
    assert a.metadata == {"solution": "Half of 2,400 is <<2400/2=1200>>1,200."}
    assert (b.id, b.answer) == ("gsm-3", "-3")
    for bad, why in [({"question": "q", "answer": "no hashes"}, "must end with '#### <final answer>'"),
                     ({"question": "q", "answer": "x ####  "}, "must end with"),
                     ({"question": "", "answer": "#### 1"}, "non-empty text 'question'"),
                     ({"question": "q", "answer": "#### 1", "level": 2}, "unknown key 'level'"),
                     (["q", "#### 1"], "must be an object")]:
        f.write_text(json.dumps({"question": "ok", "answer": "#### 1"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ConfigError, match=rf"{f}:2: .*{why}"):
            read_prompt_set(str(f), "gsm8k")
    f.write_text("{not json\n")
    with pytest.raises(ConfigError, match=rf"{f}:1: not JSON"):
        read_prompt_set(str(f), "gsm8k")


def test_math_rows_take_the_last_boxed_answer_and_keep_level_and_type(tmp_path):
    assert last_boxed(r"so \boxed{1} then $\boxed{\frac{3}{4}}$.") == r"\frac{3}{4}"
    assert last_boxed(r"$\boxed 5$") == "5" and last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{open") is None and last_boxed("none") is None
    f = tmp_path / "math.jsonl"
    recs = [{"problem": "Add.", "solution": r"It is $\boxed{\dfrac{1}{2}}$.", "level": "Level 2", "type": "Algebra"},
            {"problem": "P", "solution": "s", "answer": "7", "subject": "Geometry", "level": 1,
             "unique_id": "t/1.json"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    a, b = read_prompt_set(str(f), "math")
    assert (a.id, a.prompt, a.answer) == ("math-1", "Add.", r"\dfrac{1}{2}")
    assert a.metadata == {"level": "Level 2", "type": "Algebra", "solution": recs[0]["solution"]}
    assert (b.id, b.answer, b.metadata["subject"], b.metadata["level"]) == ("t/1.json", "7", "Geometry", 1)
    f.write_text(json.dumps(recs[0]) + "\n" + json.dumps({"problem": "P", "solution": "no box"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{f}:2: a MATH solution needs a closed \\boxed"):
        read_prompt_set(str(f), "math")
    f.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{f}:1: unknown key 'prompt' in a MATH record.*data.format=rows"):
        read_prompt_set(str(f), "math")


def test_gsm8k_parquet_and_a_save_to_disk_directory(tmp_path):
    import datasets  # rlpt[hf] pins it
    recs = [{"question": "q1", "answer": "#### 4"}, {"question": "q2", "answer": "r\n#### 1,000"}]
    ds = datasets.Dataset.from_list(recs)
    ds.to_parquet(str(tmp_path / "g.parquet"))
    ds.save_to_disk(str(tmp_path / "g_dir"))
    for where in (tmp_path / "g.parquet", tmp_path / "g_dir"):
        assert [(r.prompt, r.answer) for r in read_prompt_set(str(where), "gsm8k")] == [("q1", "4"), ("q2", "1000")]
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face dataset written by save_to_disk"):
        read_prompt_set(str(tmp_path / "plain"), "gsm8k")


def test_gsm8k_response_forms_score_by_value():
    from rlpt.envs.math_answer import verify_math
    gold = gsm8k_row({"question": "q", "answer": "#### 1,200"}, "f:1", "f-1", "f").answer
    assert [verify_math(r, gold)[0] for r in ("The answer is 1,200.", "#### 1200", "1,2 00", "120")] == [1, 1, 0, 0]


# -- training ------------------------------------------------------------------------------------------------
def _chat_ids(hf_dir: Path, text: str, system: str | None = None) -> list[int]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_grpo_on_qwen2_with_its_own_tokenizer_and_chat_template_resumes_exactly(tmp_path, models):
    job = _job(tmp_path, models["qwen2"], "data.chat_template=true")
    ctl, run, _ = run_train(job)
    rows = _metrics(run)
    trained = [r for r in rows if r.get("step/skipped") == 0.0]
    assert trained, "no step trained (all groups degenerate)"
    assert all(r["check/logp_mismatch_mean"] < 1e-5 for r in trained)          # the check ran, and passed
    assert type(ctl.trainer.model.model).__name__ == "Qwen2ForCausalLM" and ctl.rollout.backend == "engine"
    env = ctl.env
    held = env.heldout(100)
    assert len(held) == 4 and not {p.text for p in held} & {t for t, _ in env.problems}   # 25 % held out
    assert {"acc/heldout"} <= set(rows[0])
    for p in held + [env.reset()]:
        assert p.ids == _chat_ids(models["qwen2"], p.text)                        # through the chat template
        assert ctl.env.tokenizer.tok.decode(p.ids).endswith("<|im_start|>assistant\n")
    assert ctl.rollout.tokenizer.eos_id == ctl.env.tokenizer.tok.eos_token_id

    final = {k: v.clone() for k, v in ctl.trainer.model.state_dict().items()}
    shutil.rmtree(run.dir / "checkpoints" / "step_00000002")
    (run.dir / "checkpoints" / "latest").write_text("step_00000001")
    ctl_b, run_b, _ = run_train(job, resume=True)                                # step 2 again, from step 1
    for k, v in ctl_b.trainer.model.state_dict().items():
        assert torch.equal(final[k], v), k
    assert _metrics(run_b)[-1]["reward/mean"] == rows[-1]["reward/mean"]


def test_plain_encoding_and_a_system_message(tmp_path, models):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models["qwen2"])
    ctl, _ = build(_job(tmp_path, models["qwen2"], "data.chat_template=false"), models["qwen2"])
    for p in ctl.env.heldout(4):
        assert p.ids == tok.encode(p.text) and tok.convert_tokens_to_ids("<|im_start|>") not in p.ids
    ctl, _ = build(_job(tmp_path, models["qwen2"], "data.chat_template=true", "data.system='Be brief.'"),
                   models["qwen2"])
    p = ctl.env.heldout(1)[0]
    assert p.ids == _chat_ids(models["qwen2"], p.text, "Be brief.") != _chat_ids(models["qwen2"], p.text)
    rows = tmp_path / "rows.jsonl"                     # rlpt's own rows; one with its own system message
    rows.write_text(json.dumps({"prompt": "Tom has 3 pens.", "answer": "3", "system": "Count."}) + "\n"
                    + json.dumps({"prompt": "Ann has 2 cats.", "answer": "2"}) + "\n")
    job = _job(tmp_path, models["qwen2"], f"data.prompts={rows}", "data.format=rows", f"data.heldout={rows}",
               "data.chat_template=true", "data.system='Be brief.'")
    own, plain = read_prompt_set(str(rows), "rows")
    assert (own.system, plain.system) == ("Count.", None)
    assert json.loads(own.to_json())["system"] == "Count." and "system" not in json.loads(plain.to_json())
    ctl, held = build(job, models["qwen2"])
    assert [p.ids for p in held] == [_chat_ids(models["qwen2"], "Tom has 3 pens.", "Count."),
                                     _chat_ids(models["qwen2"], "Ann has 2 cats.", "Be brief.")]
    with pytest.raises(ConfigError, match="row 'rows-1' has its own system message.*data.chat_template=true"):
        build(_job(tmp_path, models["qwen2"], f"data.prompts={rows}", "data.format=rows", f"data.heldout={rows}"),
              models["qwen2"])


def test_a_math_format_set_with_a_heldout_file(tmp_path, models):
    train, held = tmp_path / "math_train.jsonl", tmp_path / "math_test.jsonl"
    rec = [{"problem": f"Tom has {i} pens.", "solution": f"So $\\boxed{{\\frac{{{i}}}{{2}}}}$.", "level": "Level 1",
            "type": "Algebra"} for i in range(1, 7)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rec[:4]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rec[4:]))
    job = _job(tmp_path, models["llama"], f"data.prompts={train}", "data.format=math", f"data.heldout={held}")
    ctl, heldout = build(job, models["llama"])
    assert [(p.text, p.gold) for p in heldout] == [("Tom has 5 pens.", r"\frac{5}{2}"),
                                                   ("Tom has 6 pens.", r"\frac{6}{2}")]
    assert sorted(ctl.env.problems) == [(f"Tom has {i} pens.", rf"\frac{{{i}}}{{2}}") for i in range(1, 5)]
    assert ctl.env.verify(heldout[1], "so the answer is 3<eos>").reward == 1.0      # 6/2 by value


def test_the_rlpt_train_command_on_a_llama_config_with_its_own_tokenizer(tmp_path, models, capsys):
    from rlpt.cli import main
    data = _gsm8k_file(tmp_path / "gsm8k.jsonl")
    args = ["train", f"model.hf_path={models['llama']}", f"data.prompts={data}", "data.format=gsm8k", "env.name=math",
            *FAST, "data.heldout=0.5", f"run.out_dir={tmp_path / 'runs'}", "run.name=llama"]
    assert main(args) == 0
    rows = [json.loads(r) for r in (tmp_path / "runs" / "llama" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("step/skipped") == 0.0]
    assert trained and all(r["check/logp_mismatch_mean"] < 1e-5 for r in trained)
    assert [r["step"] for r in rows if "acc/heldout" in r] == [0, 2]              # held-out eval at start and end
    cfg = (tmp_path / "runs" / "llama" / "config.yaml").read_text()
    assert "format: gsm8k" in cfg and "heldout: 0.5" in cfg and "chat_template: false" in cfg


def test_bad_data_settings_name_the_key(tmp_path, models):
    q = models["qwen2"]
    with pytest.raises(ValueError, match="env.name=arithmetic scores CharTokenizer ids.*env.name=math"):
        run_train(load_train_job(None, [*FAST[:7], f"run.out_dir={tmp_path / 'runs'}", f"model.hf_path={q}"]))
    with pytest.raises(ConfigError, match="data.prompts is a prompt set for env.name=math, but env.name=arithmetic"):
        _job(tmp_path, q, "env.name=arithmetic")
    data = _gsm8k_file(tmp_path / "gsm8k.jsonl")
    with pytest.raises(ConfigError, match="gpt_mini's arithmetic alphabet cannot write.*model.hf_path=<dir>.*math"):
        load_train_job(None, ["env.name=math", f"data.prompts={data}", "data.format=gsm8k"])   # gpt_mini's chars
    with pytest.raises(ConfigError, match="data.chat_template / data.system need model.hf_path"):
        load_train_job(None, ["env.name=math", "data.chat_template=true"])
    with pytest.raises(ConfigError, match="data.system is a system message"):
        _job(tmp_path, q, "data.system=hi")
    with pytest.raises(ConfigError, match="data.heldout=1.0 is a fraction"):
        _job(tmp_path, q, "data.heldout=1")
    with pytest.raises(ConfigError, match="data.format is set but data.prompts is not"):
        load_train_job(None, ["env.name=math", "data.format=math"])
    with pytest.raises(ConfigError, match="data.format"):
        _job(tmp_path, q, "data.format=csv")
    with pytest.raises(ConfigError, match=r"row .gsm8k-\d+. \(gsm8k\) is \d+ tokens, and with rollout.max_tokens=250 "
                                          r"it overflows.* 256"):
        build(_job(tmp_path, q, "rollout.max_tokens=250"), q)
    with pytest.raises(ConfigError, match=r"gsm8k.jsonl:1: .*question: unknown key .*as format gsm8k \(data.format\)"):
        build(_job(tmp_path, q, "data.format=rows"), q)
    with pytest.raises(ConfigError, match="has 16 rows: data.heldout=0.99 leaves none"):
        build(_job(tmp_path, q, "data.heldout=0.99"), q)


def test_format_coef_is_a_config_key():
    env = FormatEnv(format_coef=0.2)
    p = Prompt("<3+4+5>", [], 12)
    assert [env.verify(p, r).reward for r in ("3+4=7,7+5=12#", "12#", "13#")] == [1.0, 0.8, -0.2]
    job = load_train_job(None, ["env.name=format", "env.format_coef=0.2"])
    assert env_model_kwargs(job.env) == {"format_coef": 0.2}
    with pytest.raises(ConfigError, match="env.format_coef is set but env.name=arithmetic has no format reward"):
        load_train_job(None, ["env.format_coef=0.2"])
    with pytest.raises(ConfigError, match="env.format_coef"):
        load_train_job(None, ["env.name=format", "env.format_coef=1"])
    with pytest.raises(ValueError, match="format_coef=1.5 must be in"):
        FormatEnv(format_coef=1.5)


def test_rlpt_eval_scores_an_hf_run_with_its_own_env_and_tokenizer(tmp_path, models, capsys):
    """`rlpt eval RUN` of a model.hf_path run (here under LoRA): the run's config.yaml gives the model, the prompt set
    and the held-out rows; the held-out accuracy equals the run's own last evaluation of the same weights."""
    from rlpt.cli import main
    data = _gsm8k_file(tmp_path / "gsm8k.jsonl")
    run = tmp_path / "runs" / "q"
    assert main(["train", f"model.hf_path={models['qwen2']}", f"data.prompts={data}", "data.format=gsm8k",
                 "data.chat_template=true", *FAST, "lora.r=4", "trainer.optim.lr=1e-2", f"run.out_dir={run.parent}",
                 "run.name=q"]) == 0
    logged = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "acc/heldout" in r][-1]
    from safetensors.torch import load_file

    from rlpt.checkpoint import latest_checkpoint
    from rlpt.eval_cmd import load_hf_run
    from rlpt.models.lora import lora_state_dict
    job, policy, env = load_hf_run(str(run))
    saved = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    mine = lora_state_dict(policy)                                               # peft's names, as checkpointed
    assert mine.keys() == saved.keys() and all(torch.equal(mine[n], saved[n]) for n in saved)
    assert any("lora_B" in n and v.abs().max() > 0 for n, v in saved.items())   # trained: lora_B starts at 0
    assert [p.ids for p in env.heldout(8)] == [_chat_ids(models["qwen2"], p.text) for p in env.heldout(8)]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    rows = dict(line.strip("|").replace(" ", "").split("|")[:2] for line in capsys.readouterr().out.splitlines()[2:])
    assert float(rows["acc/heldout"]) == pytest.approx(last["acc/heldout"], abs=1e-4)
    assert float(rows["len/heldout"]) == pytest.approx(last["response/len_heldout"], abs=1e-4)
    assert (rows["problems"], rows["env"]) == ("4", "math")
    assert main(["eval", str(run), "rollout.k=2"]) == 2
    assert "takes eval.* and data.* overrides" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["engine", "simple"])
def test_a_stop_token_from_generation_config_ends_a_response(tmp_path, backend):
    """A chat model whose turn ends with a token other than its tokenizer's EOS (Llama 3 Instruct: <|eot_id|> beside
    <|end_of_text|>) lists it in generation_config.json: a response stops at its first such token (finish 'stop'),
    on both backends. Greedy first runs without it (the control, to max_tokens); the token it wrote third then
    becomes a stop token, and the same greedy response ends there."""
    from transformers import AutoTokenizer

    from rlpt.framework.rollout import Rollout
    from rlpt.gpt_mini.generate import SamplingParams
    from rlpt.models.hf import load_hf_policy
    d = _save(tmp_path, "llama")
    tok = AutoTokenizer.from_pretrained(d)
    sp = SamplingParams(max_tokens=6, temperature=0.0)

    def greedy(policy, prompt):
        return Rollout(policy, policy.tokenizer, 1, sp, backend=backend)._sample([prompt], sp)[0]
    plain = load_hf_policy(d)
    assert plain.tokenizer.stop_ids == (tok.eos_token_id,)
    # a prompt whose greedy response does not meet EOS within 6 tokens (this random model's first one that doesn't)
    prompt, control = next((p, c) for p in (tok.encode(_question(random.Random(i))[0]) for i in range(50))
                           if (c := greedy(plain, p)).finish_reason == "length")
    assert len(control.tokens) == 6 and tok.eos_token_id not in control.tokens
    end = control.tokens[2]
    cut = control.tokens.index(end) + 1
    plain.model.generation_config.eos_token_id = [tok.eos_token_id, end]
    plain.model.save_pretrained(d)
    with_stop = load_hf_policy(d)
    assert with_stop.tokenizer.stop_ids == (tok.eos_token_id, end)
    s = greedy(with_stop, prompt)
    assert (s.tokens, s.finish_reason) == (control.tokens[:cut], "stop") and cut < 6
    torch.testing.assert_close(torch.tensor(s.logps), torch.tensor(control.logps[:cut]), atol=1e-6, rtol=0)
