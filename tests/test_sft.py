"""SFT: the batch and loss by hand, the schedule, a bit-identical resume after Ctrl-C or a crash,
and the command line end to end. One `slow` test trains the default config to real accuracy."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from rlpt import sft
from rlpt.checkpoint import CheckpointError, load_state
from rlpt.cli import main
from rlpt.config import OptimConfig, load_config
from rlpt.gpt_mini.model import load_model, make_model
from rlpt.gpt_mini.task import Problem
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.optim import make_optimizer
from rlpt.run import GracefulInterrupt, StopRequested
from rlpt.sft import SFTJob


# -- building blocks ----------------------------------------------------------------------------
def test_sft_batch_fixture():
    tok = CharTokenizer()
    ids, mask = sft.sft_batch([Problem((3, 4)), Problem((12, 5, 9))], "direct", tok)
    assert [tok.decode(r) for r in ids] == ["<3+4>7#", "<12+5+9>26#"]
    assert ids.shape == (2, 11) and mask.shape == (2, 10)
    assert ids[0, 7:].tolist() == [tok.pad_id] * 4                                  # right padding
    # a target at column j is token j+1: the response "7#" is tokens 5..6, so columns 4..5
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert mask[1].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]          # "26#" is tokens 8..10
    assert tok.decode(ids[1, 1:][mask[1].bool()]) == "26#"
    ids, mask = sft.sft_batch([Problem((3, 4, 5))], "cot", tok)
    assert tok.decode(ids[0, 1:][mask[0].bool()]) == "3+4=7,7+5=12#"


def test_sft_loss_is_masked_mean_nll():
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = make_model(load_config(SFTJob, None, ["model.n_layer=1", "model.d_model=16", "model.n_head=2",
                                                      "model.n_kv_head=2", "model.d_ff=32"]).model, tok)
    ids, mask = sft.sft_batch([Problem((3, 4)), Problem((12, 5, 9))], "direct", tok)
    logp = torch.log_softmax(model(ids), -1)
    terms = [-logp[b, j, ids[b, j + 1]] for b in range(2) for j in range(ids.shape[1] - 1) if mask[b, j]]
    assert len(terms) == 5
    torch.testing.assert_close(sft.sft_loss(model, ids, mask), torch.stack(terms).mean(), atol=1e-6, rtol=0)


def test_lr_schedule():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    opt, sched = make_optimizer(model, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    want = [1 / 3, 2 / 3] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert lrs == pytest.approx(want, abs=1e-12)
    assert lrs[2] == pytest.approx(1.0) and lrs[6] == pytest.approx(0.55) and lrs[10] == pytest.approx(0.1)
    _, lin = make_optimizer(model, cfg.model_copy(update={"schedule": "linear"}), 10)
    assert [lin.lr_lambdas[0](s) for s in (0, 2, 6, 10)] == pytest.approx([1 / 3, 1.0, 0.55, 0.1])
    _, const = make_optimizer(model, cfg.model_copy(update={"schedule": "constant"}), 10)
    assert [const.lr_lambdas[0](s) for s in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_graceful_interrupt():
    handler = signal.getsignal(signal.SIGINT)
    with GracefulInterrupt() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested                              # first Ctrl-C only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)            # the second stops at once
            for _ in range(1000):                          # give the handler a bytecode boundary
                pass
    assert signal.getsignal(signal.SIGINT) is handler      # the old handler is back


# -- resume --------------------------------------------------------------------------------------
def _interrupt_at(monkeypatch, step: int, how: str):
    """Make training step `step` (0-based) deliver a real SIGINT (how='sigint') or crash (how='crash')."""
    real, calls = sft.sft_loss, []

    def patched(model, ids, mask, *rest):
        calls.append(1)
        if len(calls) == step + 1:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)        # the real Ctrl-C path: the step still finishes
            else:
                raise RuntimeError("simulated crash")
        return real(model, ids, mask, *rest)

    monkeypatch.setattr(sft, "sft_loss", patched)
    return calls


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


STEPS = 10
RESUME = [f"sft.steps={STEPS}", "sft.ckpt_every=4", "sft.keep_checkpoints=10"]


@pytest.fixture
def straight(tiny_job):
    job = tiny_job(*RESUME, "run.name=straight")
    model, run, final = sft.train_sft(job)
    return model, run, final


def test_resume_after_ctrl_c_is_bit_identical(straight, tiny_job, monkeypatch):
    model_a, run_a, final_a = straight
    job = tiny_job(*RESUME, "run.name=interrupted")
    handler = signal.getsignal(signal.SIGINT)
    calls = _interrupt_at(monkeypatch, 5, "sigint")                # SIGINT during step 5 (0-based)
    with pytest.raises(StopRequested, match="interrupted at step 6"):
        sft.train_sft(job)
    assert len(calls) == 6                                          # step 5 finished, step 6 never started
    ck = Path(job.run.out_dir) / "interrupted" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000006"          # saved at the step boundary
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert signal.getsignal(signal.SIGINT) is handler              # Ctrl-C works normally again
    _assert_same(load_model(ck / "step_00000004"), load_model(run_a.ckpt_dir / "step_00000004"))
    monkeypatch.undo()
    model_b, run_b, final_b = sft.train_sft(job, resume=True)
    _assert_same(model_a, model_b)
    assert _strip_time(run_b.read_metrics()) == _strip_time(run_a.read_metrics())
    assert final_b == final_a
    ca, cb = load_state(run_a.latest_checkpoint()), load_state(run_b.latest_checkpoint())
    assert ca["step"] == cb["step"] == STEPS and ca["data_rng"] == cb["data_rng"]


def test_resume_after_crash_is_bit_identical(straight, tiny_job, monkeypatch):
    """A crash at step 6 loses steps 5-6; resume goes back to the step-4 checkpoint and drops their metrics."""
    model_a, run_a, final_a = straight
    job = tiny_job(*RESUME, "run.name=crashed")
    _interrupt_at(monkeypatch, 6, "crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.train_sft(job)
    run_dir = Path(job.run.out_dir) / "crashed"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert max(r["step"] for r in _metrics(run_dir)) == 6        # steps 5 and 6 were logged, then lost
    monkeypatch.undo()
    model_b, run_b, final_b = sft.train_sft(job, resume=True)
    _assert_same(model_a, model_b)
    rows_a, rows_b = _strip_time(run_a.read_metrics()), _strip_time(run_b.read_metrics())
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]   # 5 and 6 logged once, not twice
    assert rows_b == rows_a and final_b == final_a


def test_resume_without_checkpoint_starts_over(tiny_job, capsys):
    job = tiny_job("sft.steps=2", "run.name=fresh")
    _, run, _ = sft.train_sft(job, resume=True)
    assert "no checkpoint" in capsys.readouterr().out
    assert run.latest_checkpoint().name == "step_00000002"


def test_init_from_checkpoint(tiny_job):
    first = tiny_job("sft.steps=2", "run.name=first")
    model, run, _ = sft.train_sft(first)
    ck = str(run.latest_checkpoint())
    m2, _, _ = sft.train_sft(tiny_job("sft.steps=1", "run.name=second", f"init_from={ck}", "sft.optim.lr=1e-9"))
    assert torch.allclose(m2.embed.weight, model.embed.weight, atol=1e-6)
    with pytest.raises(CheckpointError, match="model.n_layer: checkpoint 2 vs config 3"):
        sft.train_sft(tiny_job("sft.steps=1", "run.name=third", f"init_from={ck}", "model.n_layer=3"))


# -- the command line ----------------------------------------------------------------------------
def _cli_args(tmp_path, *extra):
    from conftest import TINY
    return [*TINY, f"run.out_dir={tmp_path}", "run.name=cli", *extra]


def test_cli_sft_and_eval(tmp_path, capsys):
    assert main(["sft", "recipes/sft_arith.yaml", *_cli_args(tmp_path, "sft.steps=2")]) == 0
    run_dir = tmp_path / "cli"
    for name in ("config.yaml", "metrics.jsonl", "report.md", "tb", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tb").iterdir())
    assert load_config(SFTJob, run_dir / "config.yaml").sft.steps == 2   # the resolved config reloads
    out = capsys.readouterr().out
    assert "acc/heldout" in out and str(run_dir) in out
    assert "acc/heldout" in (run_dir / "report.md").read_text()

    assert main(["eval", str(run_dir), "eval.size=4", "eval.max_tokens=6", "--pass-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "acc/heldout" in out and "pass@2/heldout" in out and "| problems" in out
    assert main(["eval", str(run_dir / "checkpoints" / "step_00000002"), "eval.size=3", "--split", "train"]) == 0
    assert "acc/train" in capsys.readouterr().out

    # the same folder again without --resume: refused, nothing changed
    assert main(["sft", *_cli_args(tmp_path, "sft.steps=3")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # --resume continues to the new step count, once the changed key is allowed by name
    assert main(["sft", *_cli_args(tmp_path, "sft.steps=3"), "--resume"]) == 2
    assert "sft.steps: 2 -> 3" in capsys.readouterr().err
    assert main(["sft", *_cli_args(tmp_path, "sft.steps=3"), "--resume", "--allow-change", "sft.steps"]) == 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"


def test_cli_errors(tmp_path, capsys):
    assert main(["sft", "sft.stepz=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'sft.stepz'" in err and "sft.steps" in err
    assert main(["sft", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sft", "a.yaml", "b.yaml"]) == 2
    assert main(["eval", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "model.n_layer=2"]) == 2
    assert "unknown config key 'model'" in capsys.readouterr().err
    assert main([]) == 2   # `rlpt` alone prints the commands; nothing ran


def test_cli_ctrl_c_then_resume(tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 1, "sigint")
    assert main(["sft", *_cli_args(tmp_path, "sft.steps=4")]) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert (tmp_path / "cli" / "checkpoints" / "latest").read_text() == "step_00000002"
    monkeypatch.undo()
    assert main(["sft", *_cli_args(tmp_path, "sft.steps=4"), "--resume"]) == 0
    assert [r["step"] for r in _metrics(tmp_path / "cli") if "loss/sft" in r] == [1, 2, 3, 4]


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_sft_learns_arithmetic(tmp_path):
    """The default recipe (600 steps, 4x128 model) must really learn to add.

    Measured on this project's 2-core AMD EPYC (AVX2 + AVX-512, no AMX), 1 thread, shared with other jobs,
    seeds 0 / 1 / 2 (run.seed=...): held-out greedy accuracy at step 600 0.98 / 0.99 / 0.965 (pass@4 0.98 /
    0.99 / 0.99; at step 400 0.795 / 0.895 / 0.775), last loss / first 0.014 / 0.007 / 0.013; 50-119 s each
    (49-52 s alone; on 2 threads 5-11 min whenever another torch job shared the cores). The bounds hold on any
    CPU: 0.85 is 0.115 under the worst seed, a CPU ~100 steps slower would still pass (0.92-0.975 at step 500),
    and the one other CPU measured learns this faster (the pipeline's direct stage at step 150: 0.623 on an
    Intel Xeon with AVX-512 + AMX, 0.395 here).
    """
    # run.threads=0 keeps the thread count conftest pinned (RLPT_TEST_THREADS)
    job = load_config(SFTJob, "recipes/sft_arith.yaml", [f"run.out_dir={tmp_path}", "run.progress=false"])
    _, run, final = sft.train_sft(job)
    assert final["acc/heldout"] >= 0.85, final
    assert final["pass@4/heldout"] >= final["acc/heldout"] - 0.05
    losses = [r["loss/sft"] for r in run.read_metrics() if "loss/sft" in r]
    assert losses[-1] < 0.2 * losses[0]
