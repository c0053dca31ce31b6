"""The recipes on a Hugging Face policy (issue 16, lesson 23): `rlpt recipe <file> model.hf_path=<dir>` runs every
stage kind (sft, rm, dpo, train, rs_sft) on the HF model, each stage leaving a `save_pretrained` directory that is the
next stage's start. The model is an `rlpt export`ed tiny gpt_mini (a real LlamaForCausalLM + tokenizer directory)."""
import json
import shutil

import pytest
import torch
from test_recipes import ORDER, SMALL, TINY
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlpt.checkpoint import latest_checkpoint, load_weights, read_checkpoint_meta
from rlpt.config import load_config
from rlpt.hf_policy import hf_meta, load_char_policy
from rlpt.models.export import export_checkpoint
from rlpt.models.hf import HFPolicy, load_hf_policy
from rlpt.models.lora import AdapterWeights, LoraSpec, apply_lora
from rlpt.preference.data import load_pairs
from rlpt.preference.reward_model import load_reward_model, pair_metrics
from rlpt.recipe import load_recipe, run_recipe
from rlpt.sft import SFTJob, train_sft

from conftest import TOK

SHAPE = [o for o in TINY if o.startswith("model.")]
SFT = [*SHAPE, "task.max_operands=3", "sft.format=cot", "eval.size=8", "eval.every=100", "eval.pass_k=1",
       "run.progress=false"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny gpt_mini after 20 CoT SFT steps (root/start) and its `rlpt export` (root/hf)."""
    root = tmp_path_factory.mktemp("hf_recipes")
    train_sft(load_config(SFTJob, None, [*SFT, "sft.steps=20", f"run.out_dir={root}", "run.name=start"]))
    export_checkpoint(root / "start", root / "hf")
    return root


# more prompts for the sampled data than test_recipes' SMALL: from this start, at 5 seeds, SMALL's r1 kept 0-6
# rejection samples (none at seed 3), tulu3 found 5-12 DPO pairs and instructgpt 4-16 held-out RM pairs
MORE = {"r1": ["rs.rs.prompts=128", "rs.rs.k=8"], "tulu3": ["dpo.dpo.pairs.prompts=96"],
        "instructgpt": ["rm.rm.pairs.prompts=96", "rm.rm.pairs.heldout_prompts=64"]}


def hf_recipe(name, root, *overrides):
    return load_recipe(f"recipes/{name}.yaml", [f"run.out_dir={root / 'runs'}", *TINY, *SMALL[name],
                                                *MORE.get(name, []), f"model.hf_path={root / 'hf'}", *overrides])


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def test_sft_on_the_exported_policy_follows_gpt_mini_step_for_step(start, tmp_path):
    """The same SFT job from the same weights, once as gpt_mini (init_from) and once as the HF directory: the same
    loss at every step (HF's Llama and gpt_mini compute the same function; measured equal to the last bit here),
    and the HF run's checkpoints say which directory they fine-tune."""
    more = ["sft.steps=6", "sft.log_every=1", f"run.out_dir={tmp_path}"]
    _, a, _ = train_sft(load_config(SFTJob, None, [*SFT, *more, "run.name=a", f"init_from={start / 'start'}"]))
    _, b, _ = train_sft(load_config(SFTJob, None, [*SFT, *more, "run.name=b"]), model=load_char_policy(start / "hf"),
                        meta=hf_meta(start / "hf"))
    la, lb = ([r["loss/sft"] for r in run.read_metrics() if "loss/sft" in r] for run in (a, b))
    assert len(la) == len(lb) == 6 and la[-1] < la[0]
    # equal to the last bit on this AMD EPYC; 1e-3 (of a ~3.4 loss) leaves room for another CPU's kernels and still
    # catches a wrong mask, position or token id (each moves the loss by far more)
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-3
    assert read_checkpoint_meta(latest_checkpoint(b.dir))["hf_path"] == str(start / "hf")


@pytest.mark.parametrize("name", ["instructgpt", "r1", "r1_zero", "tulu3"])
def test_every_stage_kind_runs_on_a_hugging_face_policy(start, tmp_path, name):
    """Each policy stage starts from the previous one's save_pretrained directory (the first from model.hf_path),
    trains it, and leaves its final weights there as a directory transformers loads as is; the final evaluation
    scores every directory like gpt_mini's stages (held-out, sampled and the harder slice)."""
    shutil.copytree(start / "hf", tmp_path / "hf")
    root, rows = run_recipe(hf_recipe(name, tmp_path))
    stages = [(f"{i + 1}_{s}", kind) for i, (s, kind) in enumerate(ORDER[name])]
    policy_stages = [folder for folder, kind in stages if kind != "rm"]
    assert [r["stage"] for r in rows] == policy_stages
    prev = tmp_path / "hf"
    for folder, kind in stages:
        ck = latest_checkpoint(root / folder)
        assert read_checkpoint_meta(ck)["hf_path"] == str(prev)            # it started where the last one ended
        if kind == "rm":
            continue
        out = root / folder / "hf"
        hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
        assert AutoTokenizer.from_pretrained(out, local_files_only=True).encode("<1+2>", add_special_tokens=False) \
            == TOK.encode("<1+2>")
        trained = load_char_policy(prev)
        load_weights(ck, trained)                                           # the stage's own final checkpoint
        mine, before = weights(hf), weights(load_hf_policy(prev).model)
        assert all(torch.equal(mine[k], v) for k, v in weights(trained.model).items())
        assert any(not torch.equal(mine[k], v) for k, v in before.items())  # and the stage did train it
        prev = out
    for r in rows:
        assert r["checkpoint"] == str(root / r["stage"] / "hf")
        assert 0 <= r["acc/hard"] <= 1 and 0 <= r["acc/heldout_sampled"] <= 1
    assert "harder slice" in (root / "report.md").read_text() and (root / "stages.png").is_file()


def test_instructgpt_reward_model_has_the_hf_trunk_and_reloads_exactly(start, tmp_path):
    shutil.copytree(start / "hf", tmp_path / "hf")
    root, _ = run_recipe(hf_recipe("instructgpt", tmp_path))
    rm = load_reward_model(root / "2_rm")
    assert isinstance(rm.trunk, HFPolicy) and read_checkpoint_meta(latest_checkpoint(root / "2_rm"))["kind"] \
        == "reward_model"
    held, _ = load_pairs(root / "2_rm" / "pairs_heldout.jsonl", TOK, rm.cfg.max_seq_len)
    logged = [r for r in map(json.loads, (root / "2_rm" / "metrics.jsonl").read_text().splitlines())
              if "rm/pair_acc_heldout" in r][-1]
    assert pair_metrics(rm, held, TOK)["rm/pair_acc_heldout"] == logged["rm/pair_acc_heldout"]
    assert f"model_path: {root / '2_rm'}" in (root / "3_ppo" / "config.yaml").read_text()   # PPO scored by it


def test_resume_skips_finished_stages_and_rebuilds_a_lost_directory(start, tmp_path):
    shutil.copytree(start / "hf", tmp_path / "hf")
    root, rows = run_recipe(hf_recipe("tulu3", tmp_path))
    kept = (root / "1_sft" / "hf" / "model.safetensors").stat().st_mtime_ns
    dpo = weights(load_hf_policy(root / "2_dpo" / "hf").model)
    shutil.rmtree(root / "2_dpo" / "hf")                 # lost between the stage's end and its copy
    _, again = run_recipe(hf_recipe("tulu3", tmp_path), resume=True)
    assert [(r["stage"], r["acc/heldout"], r["acc/hard"]) for r in again] == \
        [(r["stage"], r["acc/heldout"], r["acc/hard"]) for r in rows]
    assert (root / "1_sft" / "hf" / "model.safetensors").stat().st_mtime_ns == kept
    assert all(torch.equal(dpo[k], v) for k, v in weights(load_hf_policy(root / "2_dpo" / "hf").model).items())


def test_a_lora_train_stage_leaves_its_adapters_merged(start, tmp_path):
    """rlvr under LoRA: its checkpoints hold the adapters only; its directory is the merged model, with the LoRA
    policy's logits."""
    shutil.copytree(start / "hf", tmp_path / "hf")
    root, _ = run_recipe(hf_recipe("tulu3", tmp_path, "rlvr.lora.r=4", "rlvr.trainer.optim.lr=1e-2"))
    ck = latest_checkpoint(root / "3_rlvr")
    lora = apply_lora(load_hf_policy(root / "2_dpo" / "hf"), LoraSpec(r=4, alpha=16.0))
    load_weights(ck, AdapterWeights(lora))
    merged = load_hf_policy(root / "3_rlvr" / "hf")
    x = torch.tensor([TOK.encode("<3+4+5>3+4=7,")])
    with torch.no_grad():
        assert (merged(x) - lora(x)).abs().max() <= 1e-5
        assert (merged(x) - load_hf_policy(root / "2_dpo" / "hf")(x)).abs().max() > 1e-3   # the adapters moved it


def test_a_tokenizer_other_than_gpt_minis_is_refused_before_any_stage(start, tmp_path):
    other = tmp_path / "hf"
    shutil.copytree(start / "hf", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(Exception, match=r"recipe's sft stage trains on the arithmetic task"):
        hf_recipe("tulu3", tmp_path)
    assert not (tmp_path / "runs").exists()


def test_qwen_dapo_on_a_qwen2_with_its_own_tokenizer_and_a_gsm8k_file(tmp_path):
    """A model that is not gpt_mini at all (a random Qwen2 with a BPE tokenizer, tests/test_hf_data.py) runs a recipe
    of train stages on a prompt file: the stage's directory holds its tokenizer, and its row is its own last
    held-out evaluation (no character-level task to score it on)."""
    from test_hf_data import FAST, _gsm8k_file, _save
    qwen = _save(tmp_path, "qwen2")
    data = _gsm8k_file(tmp_path / "gsm8k.jsonl")
    fast = [f"dapo.{o}" for o in FAST if not o.startswith(("run.", "eval.", "steps"))]
    r = load_recipe("recipes/qwen_dapo.yaml", [f"run.out_dir={tmp_path / 'runs'}", "run.progress=false", "eval.size=8",
                                               *fast, "dapo.steps=2", "dapo.algorithm.max_draws=1",
                                               f"dapo.data.prompts={data}", f"model.hf_path={qwen}"])
    root, rows = run_recipe(r)
    out = root / "1_dapo" / "hf"
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(qwen).get_vocab()
    assert type(load_hf_policy(out).model).__name__ == "Qwen2ForCausalLM"
    logged = [r for r in map(json.loads, (root / "1_dapo" / "metrics.jsonl").read_text().splitlines())
              if "acc/heldout" in r][-1]
    assert [(r["stage"], r["acc/heldout"]) for r in rows] == [("1_dapo", logged["acc/heldout"])]


# -- a prompt set in the model's own tokenizer (data.prompts: rlpt/text_stages.py) --------------------------------
TEXT = ["run.progress=false", "eval.size=8", "eval.every=100", "eval.max_tokens=8", "data.format=rows",
        "data.heldout=0.25"]
RL_TEXT = ["rollout.k=8", "rollout.prompts_per_step=4", "rollout.max_tokens=8", "steps=2", "env.name=math"]


def _rows_file(path, n: int = 32):
    """Distinct word problems (tests/test_hf_data.py's) with a short solution to imitate, `a+b=c`."""
    import random

    from test_hf_data import _question
    rng, rows = random.Random(1), {}
    while len(rows) < n:
        q, a, b = _question(rng)
        rows[q] = {"prompt": q, "answer": str(a + b), "metadata": {"solution": f"{a}+{b}={a + b}"}}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return path


@pytest.fixture
def qwen(tmp_path):
    from test_hf_data import _save
    return _save(tmp_path, "qwen2"), _rows_file(tmp_path / "rows.jsonl")


def text_recipe(name, tmp_path, qwen, *overrides):
    return load_recipe(f"recipes/{name}.yaml", [f"run.out_dir={tmp_path / 'runs'}", *TEXT, f"model.hf_path={qwen[0]}",
                                                f"data.prompts={qwen[1]}", *overrides])


def test_text_demonstrations_are_the_rows_solutions_through_the_chat_template(qwen):
    import random

    from rlpt.hf_policy import DataSection
    from rlpt.text_stages import TextTask, text_demonstrations
    policy = load_hf_policy(qwen[0])
    data = DataSection(prompts=str(qwen[1]), format="rows", heldout=0.25, chat_template=True, system="Be brief.")
    task = TextTask(data, policy, 8, 0, "sft")
    assert len(task.rows) == 24 and not {r.prompt for r in task.rows} & {r.prompt for r in task.heldout_rows}
    ids, mask = text_demonstrations(task, 4)(random.Random(0))
    hf = AutoTokenizer.from_pretrained(qwen[0])
    rng = random.Random(0)
    for i, row in enumerate([task.rows[rng.randrange(len(task.rows))] for _ in range(4)]):
        p = list(hf.apply_chat_template([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": row.prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))
        r = hf.encode(row.metadata["solution"], add_special_tokens=False) + [hf.eos_token_id]
        assert ids[i, :len(p) + len(r)].tolist() == p + r                   # prompt, then solution + EOS
        # the loss reads the response's tokens only: column j predicts token j + 1
        assert mask[i].tolist() == [0] * (len(p) - 1) + [1] * len(r) + [0] * (ids.shape[1] - len(p) - len(r))


def test_tulu3_on_a_qwen2_with_its_own_tokenizer_and_a_prompt_set(tmp_path, qwen):
    """SFT on the rows' solutions -> DPO on the policy's own samples ranked by the math verifier -> RLVR, every
    stage on the Qwen2 and its BPE tokenizer; nothing trains on a held-out row."""
    from rlpt.envs.math_answer import verify_math
    from rlpt.hf_policy import DataSection, prompt_set_rows
    r = text_recipe("tulu3", tmp_path, qwen, "sft.sft.steps=40", "sft.sft.batch_size=8", "dpo.dpo.steps=3",
                    "dpo.dpo.batch_size=4", "dpo.dpo.pairs.prompts=24", "dpo.dpo.pairs.k=16",
                    "dpo.dpo.pairs.max_tokens=8", *[f"rlvr.{o}" for o in RL_TEXT])
    root, rows = run_recipe(r)
    assert [x["stage"] for x in rows] == ["1_sft", "2_dpo", "3_rlvr"]
    split = prompt_set_rows(DataSection(prompts=str(qwen[1]), format="rows", heldout=0.25), 8)
    gold = {x.prompt: x.answer for x in split["rows"]}
    sft = [x["loss/sft"] for x in map(json.loads, (root / "1_sft" / "metrics.jsonl").read_text().splitlines())
           if "loss/sft" in x]
    assert sft[-1] < 0.7 * sft[0]                                              # it learned the demonstrations
    pairs = [json.loads(x) for x in (root / "2_dpo" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["prompt"] in gold for p in pairs)                   # training rows only
    for p in pairs:
        assert verify_math(p["chosen"], gold[p["prompt"]])[0] == 1.0 and p["chosen"].endswith("<eos>")
        assert verify_math(p["rejected"], gold[p["prompt"]])[0] == 0.0
    prev = qwen[0]
    for x in rows:
        out = root / x["stage"] / "hf"
        assert x["checkpoint"] == str(out) and read_checkpoint_meta(latest_checkpoint(root / x["stage"]))[
            "hf_path"] == str(prev)
        assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(qwen[0]).get_vocab()
        prev = out
    assert "name: math" in (root / "3_rlvr" / "config.yaml").read_text()


def test_r1_rejection_samples_the_prompt_set_with_the_math_verifier(tmp_path, qwen):
    from rlpt.envs.math_answer import verify_math
    rl = [*RL_TEXT]
    r = text_recipe("r1", tmp_path, qwen, "cold.sft.steps=40", "cold.sft.batch_size=8", *[f"rl1.{o}" for o in rl],
                    "rs.rs.prompts=24", "rs.rs.k=16", "rs.rs.max_tokens=8", "rs.sft.steps=3", "rs.sft.batch_size=8",
                    *[f"rl2.{o}" for o in rl])
    root, rows = run_recipe(r)
    assert [x["stage"] for x in rows] == ["1_cold", "2_rl1", "3_rs", "4_rl2"]
    gold = {json.loads(x)["prompt"]: json.loads(x)["answer"] for x in qwen[1].read_text().splitlines()}
    kept = [json.loads(x) for x in (root / "3_rs.jsonl").read_text().splitlines()]
    assert kept and all(verify_math(k["response"], gold[k["prompt"]])[0] == 1.0 for k in kept)
    assert not any(k["response"].endswith("<eos>") for k in kept)              # SFT appends the EOS id itself


def test_instructgpt_on_a_prompt_set_scores_ppo_with_its_own_reward_model(tmp_path, qwen):
    """SFT -> an RM on the Qwen2 trunk from verifier-ranked pairs (held-out pairs from held-out rows) -> PPO on
    env.name=math_reward_model: rewarded by that RM's score, the math verifier's verdict beside it."""
    from rlpt.envs.math_answer import verify_math
    r = text_recipe("instructgpt", tmp_path, qwen, "sft.sft.steps=40", "sft.sft.batch_size=8", "rm.rm.steps=3",
                    "rm.rm.pairs.prompts=16", "rm.rm.pairs.heldout_prompts=16", "rm.rm.pairs.k=16", "data.heldout=0.5",
                    "rm.rm.pairs.max_tokens=8", *[f"ppo.{o}" for o in RL_TEXT if o != "env.name=math"],
                    "ppo.env.name=math_reward_model")
    root, rows = run_recipe(r)
    assert [x["stage"] for x in rows] == ["1_sft", "3_ppo"]
    rm = load_reward_model(root / "2_rm")
    assert type(rm.trunk.model).__name__ == "Qwen2ForCausalLM"
    gold = {json.loads(x)["prompt"]: json.loads(x)["answer"] for x in qwen[1].read_text().splitlines()}
    for f in ("pairs.jsonl", "pairs_heldout.jsonl"):
        for p in map(json.loads, (root / "2_rm" / f).read_text().splitlines()):
            assert verify_math(p["chosen"], gold[p["prompt"]])[0] > verify_math(p["rejected"], gold[p["prompt"]])[0]
    cfg = (root / "3_ppo" / "config.yaml").read_text()
    assert "name: math_reward_model" in cfg and f"model_path: {root / '2_rm'}" in cfg
    trained = [x for x in map(json.loads, (root / "3_ppo" / "metrics.jsonl").read_text().splitlines())
               if "reward/mean" in x]
    assert trained and all(x["reward/mean"] not in (0.0, 1.0) for x in trained)   # RM scores, not 0/1 verdicts


def test_bad_prompt_set_recipes_are_refused(tmp_path, qwen):
    from rlpt.config import ConfigError
    with pytest.raises(ConfigError, match="data.prompts is a prompt set for a model with its own tokenizer"):
        load_recipe("recipes/tulu3.yaml", [f"data.prompts={qwen[1]}"])
    with pytest.raises(ConfigError, match=r"stages\[2\] 'rlvr' \(kind train\): data.prompts is a prompt set for "
                                          r"env.name=math, but env.name=arithmetic"):
        text_recipe("tulu3", tmp_path, qwen)                                    # rlvr.env.name=math not given
