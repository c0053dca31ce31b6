"""`rlpt eval CHECKPOINT`: a checkpoint's accuracy on held-out (or training) problems, scored in chunks.

    EvalJob              the schema: task (where the problems come from), eval (how many, how long an answer)
    evaluate_in_chunks   rlpt.framework.evaluate.evaluate over chunks of EVAL_CHUNK problems, with a progress bar
    cmd_eval             the sub-command (rlpt/cli.py parses; this runs)
"""
from __future__ import annotations

from pathlib import Path

from rlpt.config import ConfigError, EvalConfig, Section, TaskConfig, check_prompt_fits, load_config, split_recipe_args


class EvalJob(Section):
    """`rlpt eval`'s schema: the task the held-out problems come from, how many, how long an answer may be
    (eval.every and eval.pass_k are the training jobs'; here --pass-k chooses k)."""
    task: TaskConfig = TaskConfig()
    eval: EvalConfig = EvalConfig()


EVAL_CHUNK = 256   # problems per evaluate() call: the progress bar moves every chunk


def evaluate_in_chunks(model, env, prompts: list, max_tokens: int, k: int = 0, progress: bool = True) -> dict:
    """rlpt.framework.evaluate.evaluate over `prompts` in chunks, with a progress bar; the same metrics.
    Every metric is a mean over the chunk's problems (acc_sampled over its k·n samples, k fixed), so the
    whole set's is the chunk means weighted by chunk size. Chunk i samples with seed i."""
    from tqdm import tqdm

    from rlpt.framework.evaluate import evaluate
    sums: dict[str, float] = {}
    seen: set[str] | None = None
    with tqdm(total=len(prompts), desc="eval", unit="problem", disable=not progress, dynamic_ncols=True) as bar:
        for i, start in enumerate(range(0, len(prompts), EVAL_CHUNK)):
            chunk = prompts[start:start + EVAL_CHUNK]
            res = evaluate(model, env, chunk, max_tokens, k=k, seed=i)
            seen = set(res) if seen is None else seen & set(res)   # a key some chunk lacks is not the set's
            for key, v in res.items():
                sums[key] = sums.get(key, 0.0) + v * len(chunk)
            bar.update(len(chunk))
    return {key: v / len(prompts) for key, v in sums.items() if key in seen}


def cmd_eval(args) -> int:
    import random

    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import make_task
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.report import fmt, table
    from rlpt.sft import sft_env

    path, overrides = split_recipe_args(args.items)
    if path is not None:
        raise ConfigError(f"rlpt eval takes key=value overrides after the checkpoint, not {path!r}")
    if "hf_path" in _meta(args.checkpoint):   # a Hugging Face policy's run: its own model, tokenizer and env
        return _eval_hf_run(args, overrides)
    job = load_config(EvalJob, None, overrides)
    model = load_model(args.checkpoint)
    try:
        check_prompt_fits(job.task, model.cfg.max_seq_len)
    except ValueError as e:
        raise ConfigError(f"{e} (the checkpoint's context)") from None
    tok, task = CharTokenizer(), make_task(job.task)
    form = args.format or _run_format(args.checkpoint)
    env = sft_env(form, task, tok)
    if args.split == "heldout":
        prompts = env.heldout(job.eval.size)
    else:
        env.rng = random.Random(0)
        prompts = [env.reset("train") for _ in range(job.eval.size)]
    res = evaluate_in_chunks(model, env, prompts, job.eval.max_tokens, k=args.pass_k)
    if args.pass_k:
        res.pop("acc_sampled")
    print(table([(f"{k}/{args.split}", fmt(v)) for k, v in res.items()]
                + [("problems", str(len(prompts))), ("format", form)]))
    return 0


def _meta(checkpoint: str) -> dict:
    """The checkpoint's metadata; {} where there is none to read (the gpt_mini path then names the problem, after
    checking the overrides)."""
    from rlpt.checkpoint import CheckpointError, read_checkpoint_meta, resolve_checkpoint
    try:
        return read_checkpoint_meta(resolve_checkpoint(checkpoint))
    except CheckpointError:
        return {}


def _eval_hf_run(args, overrides: list[str]) -> int:
    """`rlpt eval` of an `rlpt train model.hf_path=...` run (load_hf_run), scored like a gpt_mini checkpoint."""
    from rlpt.report import fmt, table
    if args.format is not None:
        raise ConfigError("--format is gpt_mini's answer format; an HF run is scored with the env it trained on")
    job, policy, env = load_hf_run(args.checkpoint, overrides)
    if args.split == "heldout":
        prompts = env.heldout(job.eval.size)
    else:
        prompts = [env.reset("train") for _ in range(job.eval.size)]
    # the run scored itself with the rollout's budget (rlpt.train's eval_fn): so here, unless eval.max_tokens is set
    given = any(o.split("=", 1)[0] == "eval.max_tokens" for o in overrides)
    max_tokens = job.eval.max_tokens if given else job.rollout.max_tokens
    res = evaluate_in_chunks(policy.eval(), env, prompts, max_tokens, k=args.pass_k)
    if args.pass_k:
        res.pop("acc_sampled")
    print(table([(f"{k}/{args.split}", fmt(v)) for k, v in res.items()]
                + [("problems", str(len(prompts))), ("max_tokens", str(max_tokens)), ("model", job.model.hf_path),
                   ("env", job.env.name)]))
    return 0


def load_hf_run(checkpoint: str, overrides: list[str] = ()):
    """An `rlpt train model.hf_path=...` checkpoint -> (the job as its config.yaml recorded it < eval.* / data.*
    overrides, the policy: model.hf_path with the checkpoint's weights or LoRA adapters, the env it trained on in
    the tokenizer it trained with: a prompt set's held-out rows for env.name=math)."""
    from rlpt.checkpoint import load_weights, resolve_checkpoint
    from rlpt.framework.environment import make_env
    from rlpt.gpt_mini.task import make_task
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.train import checkpointed, env_model_kwargs, env_tokenizer, load_policy, load_train_job, prompt_set_kwargs
    ck = resolve_checkpoint(checkpoint)
    cfg = ck.parent.parent / "config.yaml"
    if not cfg.is_file() or "rollout" not in (text := cfg.read_text()) or "\nenv:" not in "\n" + text:
        raise ConfigError(f"checkpoint {str(ck)!r} holds a Hugging Face policy, and rlpt eval reads such a checkpoint "
                          f"through its `rlpt train` run's config.yaml, which {str(cfg)!r} is not; a recipe stage's "
                          "final weights are also in its hf/ folder (a save_pretrained directory)")
    if bad := [o for o in overrides if o.split("=", 1)[0].split(".")[0] not in ("eval", "data")]:
        raise ConfigError(f"rlpt eval of an HF run takes eval.* and data.* overrides (the rest is the run's), not "
                          f"{bad[0]!r}")
    job = load_train_job(str(cfg), list(overrides))
    policy = load_policy(job, Path(job.model.hf_path), CharTokenizer())
    load_weights(ck, checkpointed(job, policy)[0])
    tok = env_tokenizer(job, policy, CharTokenizer())
    env = make_env(job.env.name, task=make_task(job.task), seed=job.run.seed, tokenizer=tok,
                   **env_model_kwargs(job.env), **prompt_set_kwargs(job, tok, policy.cfg.max_seq_len))
    return job, policy, env


def _run_format(checkpoint: str) -> str:
    """The response format a checkpoint's run was trained on, from its run folder's config.yaml:
    'tool' for a tool-using model (sft.format=tool, or RL with env.name=calculator), else 'direct'."""
    import yaml

    from rlpt.checkpoint import resolve_checkpoint
    ck = resolve_checkpoint(checkpoint)
    for cfg in (ck.parent.parent / "config.yaml", Path(checkpoint) / "config.yaml"):
        if cfg.is_file():
            data = yaml.safe_load(cfg.read_text()) or {}
            if (data.get("env") or {}).get("name") == "calculator" or (data.get("sft") or {}).get("format") == "tool":
                return "tool"
            return "direct"
    return "direct"
