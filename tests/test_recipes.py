"""`rlpt recipe` (lesson 23): each recipe's stage order and key settings, each recipe end to end at a tiny size,
resume, bad input; and what the recipes needed: PPO's KL in the reward, the format reward, rejection-sampled SFT
(sft.data_file), sft.cot_frac."""
import json

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers the algorithms
from rlpt.checkpoint import latest_checkpoint, load_state
from rlpt.cli import main
from rlpt.config import ConfigError, load_config
from rlpt.envs.format_reward import FormatEnv, format_reward, well_formed
from rlpt.framework.algorithm import AlgorithmConfigError, make_algorithm
from rlpt.framework.environment import Prompt
from rlpt.framework.trajectory import Trajectory, collate
from rlpt.gpt_mini.task import ArithmeticTask, Problem, verify
from rlpt.recipe import load_recipe, run_recipe
from rlpt.sft import SFTJob, load_demonstrations, sft_batch, sft_mixed_batch

from conftest import TOK

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.d_model=32", "model.d_ff=64",
        "model.max_seq_len=48", "task.max_operands=3", "hard.operands=4", "eval.size=16", "eval.max_tokens=24",
        "eval.every=2", "run.progress=false", "final_eval.samples=2"]
RL = ["rollout.k=4", "rollout.prompts_per_step=4", "rollout.max_tokens=24", "steps=2"]
# each recipe shrunk: a few steps per stage (overrides are <stage>.<key>=value)
SMALL = {
    "instructgpt": ["sft.sft.steps=30", "rm.rm.steps=3", "rm.rm.pairs.prompts=32", "rm.rm.pairs.heldout_prompts=32",
                    "rm.rm.pairs.k=6", *[f"ppo.{o}" for o in RL]],
    "r1_zero": ["base.sft.steps=20", *[f"grpo.{o}" for o in RL]],
    "r1": ["cold.sft.steps=40", *[f"rl1.{o}" for o in RL], "rs.rs.prompts=32", "rs.rs.k=4", "rs.rs.max_tokens=24",
           "rs.rs.min_reward=0.5", "rs.sft.steps=3", "rs.sft.batch_size=8", *[f"rl2.{o}" for o in RL]],
    "tulu3": ["sft.sft.steps=30", "dpo.dpo.steps=3", "dpo.dpo.batch_size=4", "dpo.dpo.pairs.prompts=32",
              "dpo.dpo.pairs.k=4", "dpo.dpo.pairs.max_tokens=24", *[f"rlvr.{o}" for o in RL]],
    "qwen_dapo": ["dapo.sft.steps=20", "dapo.algorithm.max_draws=2", *[f"dapo.{o}" for o in RL]],
}
ORDER = {"instructgpt": [("sft", "sft"), ("rm", "rm"), ("ppo", "train")],
         "r1_zero": [("base", "sft"), ("grpo", "train")],
         "r1": [("cold", "sft"), ("rl1", "train"), ("rs", "rs_sft"), ("rl2", "train")],
         "tulu3": [("sft", "sft"), ("dpo", "dpo"), ("rlvr", "train")],
         "qwen_dapo": [("dapo", "train")]}


def recipe(name, tmp_path=None, *overrides):
    out = [f"run.out_dir={tmp_path / 'runs'}"] if tmp_path is not None else []
    return load_recipe(f"recipes/{name}.yaml", [*out, *overrides])


def jobs(r):
    """Each stage's job as the runner builds it (placeholder checkpoints)."""
    return [r.stage_job(i, "/prev" if i else None, "/rm") for i in range(len(r.stages))]


# -- each recipe's stage order and key settings, as written (no training) ---------------------------------------
@pytest.mark.parametrize("name", sorted(ORDER))
def test_stage_order(name):
    assert [(s.name, s.kind) for s in recipe(name).stages] == ORDER[name]


def test_instructgpt_settings():
    sft, rm, ppo = jobs(recipe("instructgpt"))
    assert sft.sft.format == "cot" and rm.rm.pairs.preference == "correct" and rm.init_from == "/prev"
    a = ppo.algorithm
    assert (a.name, a.kl_in_reward, a.beta, ppo.trainer.epochs) == ("ppo", True, 1.0, 2)
    # the over-optimisation fix (docs/recipes.md): an RM trained at 1e-3, a PPO step of 2e-5 (cosine)
    assert (rm.rm.optim.lr, ppo.trainer.optim.lr, ppo.trainer.optim.schedule) == (1e-3, 2e-5, "cosine")
    assert (ppo.env.name, ppo.env.model_path) == ("reward_model", "/rm")   # the rm stage's folder, wired


def test_r1_zero_settings():
    base, grpo = jobs(recipe("r1_zero"))
    assert (base.sft.format, base.sft.cot_frac, base.init_from) == ("direct", 0.5, None)   # random weights
    assert (grpo.env.name, grpo.algorithm.name, grpo.init_from) == ("format", "grpo", "/prev")
    assert (grpo.rollout.temperature, grpo.trainer.optim.lr) == (0.7, 5e-5)   # grpo_arith's, not 1.0 / 1e-4


def test_r1_settings():
    r = recipe("r1")
    cold, rl1, rs, rl2 = jobs(r)
    assert cold.sft.format == "cot" and rl1.env.name == rl2.env.name == "format"
    assert (rl1.algorithm.name, rl2.algorithm.name) == ("grpo", "grpo")
    k = r.rs(2)
    assert (k.env, k.min_reward, k.k, k.prompts) == ("format", 1.0, 4, 512)   # correct and well formed
    assert rs.sft.optim.lr == 3e-4 and rs.init_from == "/prev"


def test_tulu3_settings():
    sft, dpo, rlvr = jobs(recipe("tulu3"))
    assert sft.sft.format == "cot" and dpo.dpo.method == "dpo" and dpo.init_from == "/prev"
    assert (rlvr.env.name, rlvr.algorithm.name, rlvr.algorithm.kl_in_reward) == ("arithmetic", "ppo", True)
    # the smaller PPO step (docs/recipes.md): 2e-5 cosine over 32 prompts x 4, not 1e-4 constant over 16 x 4
    assert (rlvr.trainer.optim.lr, rlvr.trainer.optim.schedule, rlvr.rollout.prompts_per_step) == (2e-5, "cosine", 32)


def test_qwen_dapo_settings():
    (dapo,) = jobs(recipe("qwen_dapo"))
    a = dapo.algorithm
    assert (a.name, a.clip_eps, a.clip_eps_high, a.dynamic_sampling, a.beta) == ("dapo", 0.2, 0.28, True, 0.0)
    assert (a.overlong_max_len, a.overlong_buffer, a.overlong_coef) == (32, 6, 1.0)   # the paper's 20 % ramp
    assert dapo.init_from is None and dapo.sft.steps == 180                            # its own SFT start


# -- end to end at a tiny size ----------------------------------------------------------------------------------
def chained(root, r):
    """Every stage ran to its steps and started from the previous policy stage's final checkpoint."""
    prev = None
    for i, s in enumerate(r.stages):
        folder = root / r.folder(i)
        cfg = (folder / "config.yaml").read_text()
        assert latest_checkpoint(folder) is not None, folder
        if prev is not None:
            assert f"init_from: {prev}" in cfg, folder
        if s.kind != "rm":
            prev = latest_checkpoint(folder)


@pytest.mark.parametrize("name", ["r1_zero", "tulu3", "qwen_dapo"])
def test_recipe_runs_end_to_end(tmp_path, name):
    r = recipe(name, tmp_path, *TINY, *SMALL[name])
    root, rows = run_recipe(r)
    chained(root, r)
    policy = [r.folder(i) for i, s in enumerate(r.stages) if s.kind != "rm"]
    assert [row["stage"] for row in rows] == policy
    assert all(0 <= row["acc/heldout"] <= 1 and row["seconds"] > 0 for row in rows)
    assert json.loads((root / "stages.json").read_text()) == rows and (root / "report.md").exists()


def test_instructgpt_end_to_end_and_resume(tmp_path, capsys):
    r = recipe("instructgpt", tmp_path, *TINY, *SMALL["instructgpt"])
    root, rows = run_recipe(r)
    chained(root, r)
    assert [row["stage"] for row in rows] == ["1_sft", "3_ppo"]       # the RM is not a policy
    cfg = (root / "3_ppo" / "config.yaml").read_text()
    assert f"model_path: {root / '2_rm'}" in cfg and "kl_in_reward: true" in cfg
    metrics = [json.loads(x) for x in (root / "3_ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/shaped_mean" in m and m["loss/kl"] == 0.0 for m in metrics if "loss/pg" in m)
    before = {f: (latest_checkpoint(root / f) / "model.safetensors").read_bytes() for f in ("1_sft", "2_rm", "3_ppo")}
    capsys.readouterr()
    _, again = run_recipe(r, resume=True)
    out = capsys.readouterr().out
    assert all(f"{f} ({k}) already finished" in out for f, k in (("1_sft", "sft"), ("2_rm", "rm"), ("3_ppo", "train")))
    assert {f: (latest_checkpoint(root / f) / "model.safetensors").read_bytes() for f in before} == before
    assert [x["seconds"] for x in again] == [x["seconds"] for x in rows]
    assert [x["acc/heldout"] for x in again] == [x["acc/heldout"] for x in rows]
    with pytest.raises(FileExistsError, match="--resume"):             # without --resume: an error, nothing changed
        run_recipe(r)


def test_r1_end_to_end_rejection_sampled_sft(tmp_path):
    r = recipe("r1", tmp_path, *TINY, *SMALL["r1"])
    root, rows = run_recipe(r)
    chained(root, r)
    assert [row["stage"] for row in rows] == ["1_cold", "2_rl1", "3_rs", "4_rl2"]
    demos = [json.loads(x) for x in (root / "3_rs.jsonl").read_text().splitlines()]
    task = ArithmeticTask(max_operands=3)
    for d in demos:   # every kept sample: a training prompt, ended by EOS, reward ≥ rs.min_reward (0.5: correct)
        p = Problem(tuple(int(x) for x in d["prompt"][1:-1].split("+")))
        assert not task.is_heldout(p) and d["response"].endswith("#")
        assert verify(d["response"], p.gold) == 1.0
    assert len({d["prompt"] for d in demos}) == len(demos)            # rs.max_per_prompt = 1
    assert f"data_file: {root / '3_rs.jsonl'}" in (root / "3_rs" / "config.yaml").read_text()


def test_cli_recipe(tmp_path, capsys):
    argv = ["recipe", "recipes/qwen_dapo.yaml", *TINY, *SMALL["qwen_dapo"], f"run.out_dir={tmp_path}", "dapo.steps=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1_dapo" in out and "recipe folder" in out
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err


# -- bad input names the stage and the key ----------------------------------------------------------------------
def write(tmp_path, stages, **top):
    import yaml
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**top, "stages": stages}))
    return str(p)


@pytest.mark.parametrize("stages,match", [
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "grpo"}], r"stages\[1\]\.kind 'grpo'"),
    ([{"name": "a", "kind": "sft", "sft": {"stepz": 3}}],
     r"stages\[0\] 'a' \(kind sft\): unknown config key 'sft.stepz'"),
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "train", "rollout": {"kk": 2}}],
     r"stages\[1\] 'b' \(kind train\): unknown config key 'rollout.kk'"),
    ([{"name": "a", "kind": "rm"}], r"stages\[0\] 'a' \(kind rm\) needs a policy stage before it"),
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "train", "env": {"name": "reward_model"}}],
     r"stages\[1\] 'b': env.name=reward_model needs an rm stage"),
    ([{"name": "a", "kind": "sft", "model": {"n_layer": 1}}], r"stages\[0\] 'a': key 'model' is set by the recipe"),
    ([{"name": "a", "kind": "sft"}, {"name": "a", "kind": "sft"}], r"stages\[1\] 'a': a second stage"),
    ([{"name": "run", "kind": "sft"}], r"stages\[0\]\.name 'run'"),
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "rs_sft", "rs": {"k": 0}}],
     r"stages\[1\] 'b' \(kind rs_sft\): rs: config key 'k'"),
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "rs_sft", "rs": {"env": "nope"}}],
     r"stages\[1\] 'b' \(kind rs_sft\): rs.env: unknown env 'nope'"),
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "rs_sft", "rs": {"env": "reward_model"}}],
     r"stages\[1\] 'b' \(kind rs_sft\): rs.env=reward_model scores with a model"),
    ([], r"non-empty list"),
])
def test_bad_recipe_names_the_stage_and_key(tmp_path, stages, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(write(tmp_path, stages), [])


def test_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="'nope' is neither a shared section"):
        recipe("r1", tmp_path, "nope.steps=3")
    with pytest.raises(ConfigError, match=r"stages\[1\] 'rl1' \(kind train\): unknown config key 'stepz'"):
        recipe("r1", tmp_path, "rl1.stepz=3")
    with pytest.raises(ConfigError, match=r"model.hf_path=.* has no config.json"):   # not an HF directory
        load_recipe(write(tmp_path, [{"name": "a", "kind": "sft"}]), [f"model.hf_path={tmp_path}"])
    assert recipe("r1", tmp_path, "rl2.steps=7").stage_job(3, "/x", None).steps == 7


# -- PPO with the KL in the reward (InstructGPT) ----------------------------------------------------------------
def ppo_traj():
    t = Trajectory([1], [2, 3, 4], torch.ones(3), torch.tensor([-0.5, -1.0, -0.2]), reward=1.0)
    t.ref_logp = torch.tensor([-0.7, -0.9, -0.2])                    # log π_old − log π_ref = 0.2, −0.1, 0
    t.extra = {"values": torch.tensor([0.3, 0.4, 0.6])}
    return t


def test_ppo_kl_in_reward_hand_computed():
    t = ppo_traj()
    a = make_algorithm({"name": "ppo", "kl_in_reward": True, "beta": 0.5, "whiten": False}, 1, 8)
    a.compute_advantages([[t]])
    # r = [−0.5·0.2, −0.5·(−0.1), 1 − 0] = [−0.1, 0.05, 1.0];  γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t
    assert t.advantage.tolist() == pytest.approx([0.95 - 0.3, 1.05 - 0.4, 1.0 - 0.6])
    assert t.extra["returns"].tolist() == pytest.approx([0.95, 1.05, 1.0])
    assert t.info["shaped_reward"] == pytest.approx(0.95)
    u = ppo_traj()                                                    # without: the KL stays out of the reward
    make_algorithm({"name": "ppo", "beta": 0.5, "whiten": False}, 1, 8).compute_advantages([[u]])
    assert u.advantage.tolist() == pytest.approx([0.7, 0.6, 0.4]) and "shaped_reward" not in u.info


def test_ppo_kl_in_reward_has_no_kl_loss_term():
    t = ppo_traj()
    t.extra["returns"] = torch.zeros(3)
    t.advantage = torch.zeros(3)
    b = collate([t], pad_id=0)
    new = b.old_logp.clone()
    cfg = {"name": "ppo", "beta": 0.5, "value_coef": 0.0}
    _, on = make_algorithm({**cfg, "kl_in_reward": True}, 1, 8).compute_loss(b, new, values=torch.zeros_like(new))
    _, off = make_algorithm(cfg, 1, 8).compute_loss(b, new, values=torch.zeros_like(new))
    assert float(on["loss/kl"]) == 0.0 and float(off["loss/kl"]) > 0
    assert float(on["kl/mean"]) == pytest.approx(float(off["kl/mean"]))   # still logged, same estimator
    with pytest.raises(AlgorithmConfigError, match="algorithm.kl_in_reward"):
        make_algorithm({"name": "ppo", "kl_in_reward": True, "beta": 0.0}, 1, 8)


# -- the format reward (R1-Zero) --------------------------------------------------------------------------------
@pytest.mark.parametrize("response,formed,reward", [
    ("3+4=7,7+5=12#", True, 1.0),      # correct, well formed
    ("12#", False, 0.5),               # correct, a bare answer
    ("3+4=8,8+5=13#", True, 0.0),      # wrong, well formed: the format is not the arithmetic
    ("13#", False, -0.5),              # wrong, bare
    ("3+4=7,7+5=12", False, 0.5),      # truncated: no EOS
    ("3+4=7,,7+5=12#", False, 0.5),    # an empty step
    ("so 3+4=7,7+5=12#", False, 0.5),  # text around the chain
    ("3+4=7#", True, -1.0 + 1.0),      # one step is a chain (wrong here: 7 ≠ 12)
])
def test_format_reward_hand_cases(response, formed, reward):
    assert well_formed(response) is formed
    assert format_reward(response, 12) == reward
    v = FormatEnv().verify(Prompt("<3+4+5>", TOK.encode("<3+4+5>"), 12), response)
    assert v.reward == reward and v.info == {"correct": verify(response, 12) == 1.0, "well_formed": formed}
    assert (v.reward > 0) == v.info["correct"]                        # reward > 0 still means correct


# -- rejection-sampled SFT's data file, and the base model's mix ------------------------------------------------
def test_load_demonstrations_and_its_errors(tmp_path):
    task = ArithmeticTask()
    assert task.is_heldout(Problem((3, 4))) and not task.is_heldout(Problem((1, 2)))   # the default split
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "<1+2>", "response": "1+2=3#"}\n\n{"prompt": "<1+1>", "response": "2#"}\n')
    assert load_demonstrations(p, TOK, 48, task) == [(TOK.encode("<1+2>"), TOK.encode("1+2=3#")),
                                                     (TOK.encode("<1+1>"), TOK.encode("2#"))]
    bad = {'{"prompt": "<3+4>", "response": "3+4=7"}': "line 1: the response must end with the EOS",
           'not json': "line 1: not valid JSON",
           '{"prompt": "<3+4>"}': "line 1: expected an object with non-empty string fields",
           '{"prompt": "<3+4>", "response": "7!#"}': "line 1: field 'response' holds '!'",
           '{"prompt": "<3+4>", "response": "3+4=7#"}': "prompt <3.4> is in the task's held-out split",
           json.dumps({"prompt": "<3+4>", "response": "1" * 60 + "#"}): "more than model.max_seq_len=48"}
    for line, match in bad.items():
        p.write_text(line + "\n")
        with pytest.raises(ConfigError, match=match):
            load_demonstrations(p, TOK, 48, task)
    with pytest.raises(ConfigError, match="does not exist"):
        load_demonstrations(tmp_path / "none.jsonl", TOK, 48)


def test_sft_cot_frac():
    problems = [Problem((3, 4)), Problem((1, 2, 5))]
    mixed = sft_mixed_batch(problems, ["cot", "cot"], TOK)
    plain = sft_batch(problems, "cot", TOK)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], plain[1])
    with pytest.raises(ConfigError, match="sft.cot_frac"):
        load_config(SFTJob, None, ["sft.format=tool", "sft.cot_frac=0.5"])


def test_sft_data_file_trains_on_the_files_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "<1+2>", "response": "1+2=3#"}\n')
    from rlpt.sft import train_sft
    job = load_config(SFTJob, None, [f"sft.data_file={p}", "sft.steps=2", "sft.batch_size=2", "eval.size=4",
                                     "eval.every=2", "eval.pass_k=1", f"run.out_dir={tmp_path}", "run.progress=false",
                                     "model.n_layer=1", "model.d_model=32", "model.d_ff=32", "model.n_head=2",
                                     "model.n_kv_head=1"])
    _, run, _ = train_sft(job)
    m = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    toks = [x["tokens/step"] for x in m if "tokens/step" in x]
    assert toks and all(x == 12 for x in toks)                        # 2 rows × len("1+2=3#") each step
    assert load_state(latest_checkpoint(run.dir))["step"] == 2


def test_qwen_dapo_on_a_hugging_face_policy(tmp_path):
    """model.hf_path: the one train stage runs on an `rlpt export`ed gpt_mini (no SFT start trained); its row is the
    stage's own last held-out evaluation."""
    from rlpt.models.export import export_checkpoint
    from rlpt.sft import train_sft
    shape = [o for o in TINY if o.startswith("model.")]
    start = load_config(SFTJob, None, [*shape, "task.max_operands=3", "sft.steps=20", "sft.format=cot", "eval.size=8",
                                       "eval.pass_k=1", f"run.out_dir={tmp_path}", "run.name=sft",
                                       "run.progress=false"])
    train_sft(start)
    export_checkpoint(tmp_path / "sft", tmp_path / "hf")
    r = recipe("qwen_dapo", tmp_path, *TINY, *SMALL["qwen_dapo"], f"model.hf_path={tmp_path / 'hf'}")
    root, rows = run_recipe(r)
    assert not (root / "1_dapo" / "sft").exists() and "hf_path" in (root / "1_dapo" / "config.yaml").read_text()
    m = [json.loads(x) for x in (root / "1_dapo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == "1_dapo" and rows[0]["acc/heldout"] == [x for x in m if "acc/heldout" in x][-1][
        "acc/heldout"]
    assert "1_dapo" in (root / "report.md").read_text()
