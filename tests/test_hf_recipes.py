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


def hf_recipe(name, root, *overrides):
    return load_recipe(f"recipes/{name}.yaml", [f"run.out_dir={root / 'runs'}", *TINY, *SMALL[name],
                                                f"model.hf_path={root / 'hf'}", *overrides])


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
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5
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
