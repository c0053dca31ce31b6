"""recipes/tulu3.yaml three ways from the same random initial weights (docs/real_models.md "Recipes on a Hugging
Face policy"): on gpt_mini, on those weights written as a LlamaForCausalLM directory with gpt_mini's tokenizer
(`model.hf_path`), and on that directory through the prompt-set path (`data.prompts`: the arithmetic task as 2,000
rows with their chain of thought as `metadata.solution`, the task's held-out problems as `data.heldout`, the math
verifier; rlpt/text_stages.py).

    python examples/recipe_hf.py gpt|hf|text [--out runs/recipe_hf] [key=value ...]    # ~3-4 min each here

Each prints one JSON line last: the stages' rows (held-out greedy, ...) and the wall clock.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from rlpt.gpt_mini.model import make_model
from rlpt.gpt_mini.task import demonstration, make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.models.export import char_tokenizer_to_hf
from rlpt.models.hf import gpt_mini_to_hf
from rlpt.recipe import load_recipe, run_recipe

RECIPE = "recipes/tulu3.yaml"


def init_dir(out: Path, overrides: list[str]) -> Path:
    """The random weights tulu3's first sft stage starts gpt_mini from (its seed, its shape), as an HF directory."""
    r = load_recipe(RECIPE, overrides)
    tok = CharTokenizer()
    torch.manual_seed(r.run.seed)                  # what train_sft draws its random init from
    hf = gpt_mini_to_hf(make_model(r.model.gpt_mini(), tok), eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                        bos_token_id=None)
    d = out / "init_hf"
    hf.save_pretrained(d)
    char_tokenizer_to_hf(tok).save_pretrained(d)
    return d


def prompt_set(out: Path, overrides: list[str]) -> tuple[Path, Path]:
    """2,000 distinct training problems and the task's 400 held-out ones as prompt-set rows (format rows)."""
    task = make_task(load_recipe(RECIPE, overrides).task)
    rng, train = random.Random(0), {}
    while len(train) < 2000:
        p = task.sample(rng, "train")
        train[p.prompt] = p

    def write(path: Path, problems) -> Path:
        path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "prompt": p.prompt, "answer": str(p.gold),
                                            "metadata": {"solution": demonstration(p, "cot")[0].removesuffix("#")}})
                                + "\n" for i, p in enumerate(problems)))
        return path
    return write(out / "arith_train.jsonl", train.values()), write(out / "arith_heldout.jsonl", task.heldout_set(400))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", choices=["gpt", "hf", "text"])
    ap.add_argument("--out", default="runs/recipe_hf")
    ap.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    args = ap.parse_intermixed_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ov = ["run.progress=false", f"run.out_dir={out}", f"run.name=tulu3_{args.path}", *args.overrides]
    if args.path in ("hf", "text"):
        ov.append(f"model.hf_path={init_dir(out, args.overrides)}")
    if args.path == "text":
        train, held = prompt_set(out, args.overrides)
        ov += [f"data.prompts={train}", f"data.heldout={held}", "rlvr.env.name=math"]
    t0 = time.perf_counter()
    _, rows = run_recipe(load_recipe(RECIPE, ov))
    print(json.dumps({"path": args.path, "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}))


if __name__ == "__main__":
    main()
