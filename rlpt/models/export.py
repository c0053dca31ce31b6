"""`rlpt export`: a trained gpt_mini as a real Hugging Face model directory, loadable with no rlpt installed.

    rlpt export runs/grpo out/grpo-hf            # a run folder (its latest checkpoint) or a checkpoint folder
    python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; \
               m = M.from_pretrained('out/grpo-hf'); t = T.from_pretrained('out/grpo-hf')"

The directory is `save_pretrained`'s layout: `config.json` + `generation_config.json` + `model.safetensors`
of a `LlamaForCausalLM` (gpt_mini *is* a Llama block: `rlpt.models.hf.gpt_mini_to_hf`, equal logits to 1e-5),
and `tokenizer.json` + `tokenizer_config.json` of a `PreTrainedTokenizerFast` built locally from gpt_mini's
character tokenizer (`char_tokenizer_to_hf`): the same ids for every character, NUL (gpt_mini's pad) written
as the special token `<pad>`, `#` as EOS. `rlpt_export.json` records where the weights came from (checkpoint
path, step, sha256 of its model.safetensors). After writing, the export is read back with
`AutoModelForCausalLM.from_pretrained` and its logits compared with gpt_mini's on a probe sentence, so a
broken export fails here, not later in someone else's pipeline.

Needs the optional dependency: `pip install rlpt[hf]`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rlpt.gpt_mini.tokenizer import ALPHABET, PAD, CharTokenizer

# torch, transformers and the checkpoint code are imported inside the functions: `rlpt --help` and
# `rlpt lab` build the parser (add_commands) without loading torch

PAD_TOKEN = "<pad>"       # NUL is no good as a token string in JSON tools; the id stays 0
PROBE = "<12+7+9>28#"     # a sentence of the arithmetic language, for the read-back check
EXPORT_ATOL = 1e-4        # fp32 logits, HF's SDPA against gpt_mini's: measured ~1e-6


def char_tokenizer_to_hf(tok: CharTokenizer | None = None):
    """A `PreTrainedTokenizerFast` with CharTokenizer's ids: one character, one token, decode joins them back.

    An unknown character is an error in both (the WordLevel model has no unk token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = tok or CharTokenizer()
    vocab = {(PAD_TOKEN if ch == PAD else ch): i for i, ch in enumerate(tok.alphabet)}
    core = Tokenizer(models.WordLevel(vocab))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")      # each character alone
    core.decoder = decoders.Fuse()                                                   # join without spaces
    eos = tok.alphabet[tok.eos_id]
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=PAD_TOKEN,
                                   model_max_length=None, clean_up_tokenization_spaces=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_out_dir(out_dir: Path, force: bool) -> None:
    from rlpt.config import ConfigError
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export target {str(out_dir)!r} is a file; name a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"export target {str(out_dir)!r} is not empty; choose a new directory or pass --force "
                          "to write over the files there")


def export_checkpoint(src: str | Path, out_dir: str | Path, force: bool = False) -> dict:
    """Write the gpt_mini of `src` (run or checkpoint folder) as a HF Llama directory; -> a summary dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlpt.checkpoint import CheckpointError, read_checkpoint_meta, resolve_checkpoint
    from rlpt.gpt_mini.model import load_model
    from rlpt.models.hf import gpt_mini_to_hf
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    ckpt = resolve_checkpoint(src)                      # CheckpointError: not a run folder nor a checkpoint
    tok = CharTokenizer()
    vocab = read_checkpoint_meta(ckpt).get("vocab_size")
    if vocab != tok.vocab_size:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has vocab_size={vocab} but gpt_mini's character "
                              f"tokenizer has {tok.vocab_size} tokens: only models trained on "
                              "rlpt.gpt_mini.tokenizer.ALPHABET can be exported with their tokenizer")
    gpt = load_model(ckpt).float().eval()
    try:   # a gpt_mini without RoPE or with operand-index embeddings has no Llama form: nothing is written
        hf = gpt_mini_to_hf(gpt, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=None)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {e}") from None
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = tok.eos_id, tok.pad_id
    hf.generation_config.bos_token_id = None
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    char_tokenizer_to_hf(tok).save_pretrained(out_dir)
    provenance = {"source_checkpoint": str(ckpt.resolve()), "step": _step_of(ckpt),
                  "source_sha256": _sha256(ckpt / "model.safetensors"), "format": "LlamaForCausalLM",
                  "alphabet": ALPHABET[1:], "params": gpt.num_params()}
    (out_dir / "rlpt_export.json").write_text(json.dumps(provenance, indent=1) + "\n")

    # read back exactly as a user would, and compare with gpt_mini
    back = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    ids = hf_tok.encode(PROBE, add_special_tokens=False)
    if ids != tok.encode(PROBE):
        raise RuntimeError(f"exported tokenizer encodes {PROBE!r} as {ids}, gpt_mini as {tok.encode(PROBE)}")
    x = torch.tensor([ids])
    with torch.no_grad():
        gap = float((back(x).logits - gpt(x)).abs().max())
    if not gap <= EXPORT_ATOL:
        raise RuntimeError(f"exported model's logits differ from gpt_mini's by {gap:.3g} (> {EXPORT_ATOL})")
    return {**provenance, "out_dir": str(out_dir), "max_abs_logit_gap": gap}


def _step_of(ckpt: Path) -> int | None:
    name = ckpt.name
    return int(name.split("_", 1)[1]) if name.startswith("step_") and name[5:].isdigit() else None


def cmd_export(args) -> int:
    from rlpt.models.hf import quiet_progress
    with quiet_progress():                     # one summary line, not transformers' save / load bars
        summary = export_checkpoint(args.source, args.out_dir, force=args.force)
    print(f"exported {summary['source_checkpoint']} (step {summary['step']}, {summary['params']:,} params) as "
          f"LlamaForCausalLM + PreTrainedTokenizerFast to {summary['out_dir']}; "
          f"read back with transformers: max |Δlogit| = {summary['max_abs_logit_gap']:.2g}")
    return 0


def add_commands(sub) -> None:
    """Register `rlpt export` on rlpt's sub-parsers."""
    e = sub.add_parser("export", help="write a trained gpt_mini as a Hugging Face LlamaForCausalLM directory "
                                      "(save_pretrained layout + its character tokenizer)")
    e.add_argument("source", help="a run folder (its latest checkpoint) or a checkpoint folder")
    e.add_argument("out_dir", help="the directory to write (must be new or empty unless --force)")
    e.add_argument("--force", action="store_true", help="write into a non-empty out_dir, over its files")
    e.set_defaults(fn=cmd_export)
