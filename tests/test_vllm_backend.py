"""rollout.backend=vllm on a real vLLM (never a double): greedy tokens equal the engine's on an `rlpt export`ed
gpt_mini, sampled log-probs equal the trainer's, a weight update changes the outputs and equals a fresh load, the
generator's seeds reproduce, and `rlpt train rollout.backend=vllm` trains with the run-time log-prob check.

Needs vLLM (vllm==0.33.0, pyproject's `vllm` extra), a CUDA wheel: `make test-vllm` builds .venv-vllm on a CUDA
machine and runs this file (and tests/test_vllm_plumbing.py, the parts that need no vLLM and also run under
`make test`). Elsewhere the whole module is reported as skipped, with the reason; where vLLM imports but finds
no device, the engine tests are."""
from __future__ import annotations

import copy
import json

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed in this environment: rollout.backend=vllm's tests need vllm==0.33.0, a "
                   "CUDA wheel (`make test-vllm` on a CUDA machine builds .venv-vllm with it and runs them); the "
                   "vLLM-free parts are tests/test_vllm_plumbing.py")

from vllm.logprobs import Logprob  # noqa: E402
from vllm.outputs import CompletionOutput  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from rlpt.engine.backend import EngineBackend  # noqa: E402
from rlpt.engine.vllm_backend import VLLMBackend, sampling_kwargs, shutdown_engines, to_sample  # noqa: E402
from rlpt.framework.environment import ArithmeticEnv  # noqa: E402
from rlpt.framework.trajectory import per_token_logp  # noqa: E402
from rlpt.gpt_mini.generate import SamplingParams  # noqa: E402
from rlpt.gpt_mini.task import ArithmeticTask  # noqa: E402
from rlpt.models.export import export_checkpoint  # noqa: E402
from rlpt.models.hf import load_hf_policy  # noqa: E402
from rlpt.sft import SFTJob, train_sft  # noqa: E402
from rlpt.train import load_train_job, run_train  # noqa: E402

from conftest import TINY_RL, TOK  # noqa: E402

# head_dim 64 (vLLM's attention kernels take 32, 64, 128, ...; TINY_SHAPE's 16 is below them); fp32 weights
SHAPE = ["model.d_model=128", "model.n_head=2", "model.n_kv_head=1", "model.d_ff=256"]
KW = {"enforce_eager": True, "gpu_memory_utilization": 0.25}     # one engine, shared by the tests (same kwargs)
TOL = 1e-4                                                       # fp32: vLLM's kernels vs the trainer's forward
# vLLM imports on a machine without its device (a CUDA wheel on a CPU box) but cannot start an engine there
engine = pytest.mark.skipif(current_platform.is_unspecified(), reason="vLLM is installed but finds no device to "
                            "run on (no CUDA GPU for this CUDA build): the engine tests need one")


def test_vllms_own_sampling_params_and_outputs_round_trip():
    """No engine: vLLM's SamplingParams takes exactly what sampling_kwargs gives it, and to_sample reads vLLM's own
    CompletionOutput / Logprob as LLM.generate returns them with logprobs=0 (the sampled token's log-prob)."""
    sp = SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, top_k=5)
    params = vllm.SamplingParams(**sampling_kwargs(sp, 4, 123, eos_id=11))
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens, params.logprobs,
            params.seed, params.stop_token_ids, params.ignore_eos, params.detokenize) == \
        (4, 0.7, 0.9, 5, 12, 0, 123, [11], True, False)
    greedy = vllm.SamplingParams(**sampling_kwargs(SamplingParams(temperature=0.0), 1, None, 11))
    assert greedy.sampling_type.name == "GREEDY"

    def out(tokens, reason):
        return CompletionOutput(index=0, text="", token_ids=tokens, cumulative_logprob=None, finish_reason=reason,
                                logprobs=[{t: Logprob(logprob=-0.5 * (j + 1), rank=1)} for j, t in enumerate(tokens)])
    s = to_sample(out([3, 4, 11], "stop"), eos_id=11)
    assert (s.tokens, s.logps, s.finish_reason) == ([3, 4, 11], [-0.5, -1.0, -1.5], "stop")
    assert to_sample(out([3, 4], "length"), eos_id=11).finish_reason == "length"
    assert to_sample(out([3, 11], "length"), eos_id=11).finish_reason == "stop"       # EOS on the last budget token
    with pytest.raises(RuntimeError, match="abort"):
        to_sample(out([3], "abort"), eos_id=11)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small gpt_mini after 30 CoT SFT steps (TINY_RL's start, head_dim 64), exported with `rlpt export`."""
    root = tmp_path_factory.mktemp("vllm")
    job = load_train_job(None, [*TINY_RL, *SHAPE, f"run.out_dir={root}", "run.name=start"])
    train_sft(SFTJob(run=job.run.model_copy(update={"name": "sft"}), model=job.model.gpt_mini(), task=job.task,
                     sft=job.sft, eval=job.eval.model_copy(update={"pass_k": 1, "size": 8})))
    export_checkpoint(root / "sft", root / "hf")
    yield root / "hf"
    shutdown_engines()


@pytest.fixture(scope="module")
def policy(hf_dir):
    return load_hf_policy(hf_dir).eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    env = ArithmeticEnv(ArithmeticTask(max_operands=3), seed=seed, tokenizer=TOK)
    return [env.reset("heldout").ids for _ in range(n)]


def _trainer_logps(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        lp = per_token_logp(model, torch.tensor([prompt + tokens]), temperature)[0]
    return lp[len(prompt) - 1:]


@engine
def test_greedy_tokens_equal_the_engines_on_the_exported_gpt_mini(policy):
    prompts = _prompts(16)
    sp = SamplingParams(max_tokens=24, temperature=0.0)
    engine = EngineBackend()(policy, prompts, sp, TOK.eos_id, TOK.pad_id)
    served = VLLMBackend(**KW)(policy, prompts, sp, TOK.eos_id, TOK.pad_id)
    assert [s.tokens for s in served] == [s.tokens for s in engine]
    assert [s.finish_reason for s in served] == [s.finish_reason for s in engine]
    assert any(s.finish_reason == "stop" and s.tokens[-1] == TOK.eos_id for s in served)   # EOS kept, as rlpt's
    for a, b in zip(served, engine):
        assert max(abs(x - y) for x, y in zip(a.logps, b.logps)) < TOL


@engine
def test_sampled_logprobs_equal_the_trainers_at_the_rollout_temperature(policy):
    prompts = [p for p in _prompts(8) for _ in range(4)]             # 8 groups of K = 4: one request with n = 4 each
    T = 0.7
    samples = VLLMBackend(**KW)(policy, prompts, SamplingParams(max_tokens=24, temperature=T), TOK.eos_id,
                                TOK.pad_id, torch.Generator().manual_seed(0))
    assert len({tuple(s.tokens) for s in samples}) > 8                 # it sampled: the copies of a prompt differ
    gaps, raw_gaps = [], []
    for p, s in zip(prompts, samples):
        got = torch.tensor(s.logps)
        gaps.append((got - _trainer_logps(policy, p, s.tokens, T)).abs().max().item())
        raw_gaps.append((got - _trainer_logps(policy, p, s.tokens, 1.0)).abs().max().item())
    assert max(gaps) < TOL, max(gaps)
    assert max(raw_gaps) > 1e-2          # the temperature is in them: processed, not raw, log-probs (lesson 02)


@engine
def test_the_generators_seeds_reproduce_and_another_seed_draws_otherwise(policy):
    prompts = [p for p in _prompts(4) for _ in range(4)]
    sp = SamplingParams(max_tokens=24, temperature=1.0)
    backend = VLLMBackend(**KW)
    a, b, c = (backend(policy, prompts, sp, TOK.eos_id, TOK.pad_id, torch.Generator().manual_seed(s))
               for s in (3, 3, 4))
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert max(abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa.logps, sb.logps)) < 1e-6
    assert [s.tokens for s in a] != [s.tokens for s in c]


@engine
def test_a_weight_update_changes_the_outputs_and_equals_a_fresh_load(policy):
    model = copy.deepcopy(policy)
    prompts = [p for p in _prompts(6, seed=1) for _ in range(2)]
    greedy, sampled = SamplingParams(max_tokens=24, temperature=0.0), SamplingParams(max_tokens=24, temperature=1.0)
    backend = VLLMBackend(**KW)

    def run(b):
        return (b(model, prompts, greedy, TOK.eos_id, TOK.pad_id),
                b(model, prompts, sampled, TOK.eos_id, TOK.pad_id, torch.Generator().manual_seed(5)))
    before = run(backend)
    reloads = backend.engine(model).reloads
    with torch.no_grad():                                  # an optimizer step's kind of change: in place
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    after = run(backend)
    assert backend.engine(model).reloads == reloads + 1                   # pushed once, through reload_weights
    assert [s.tokens for s in after[0]] != [s.tokens for s in before[0]]
    for p, s in zip(prompts, after[1]):                                  # the new weights, all of them
        assert (torch.tensor(s.logps) - _trainer_logps(model, p, s.tokens, 1.0)).abs().max() < TOL
    shutdown_engines()
    fresh = run(VLLMBackend(**KW))                                        # built from the updated weights
    for x, y in zip(after, fresh):
        assert [s.tokens for s in x] == [s.tokens for s in y]
        assert max(abs(u - v) for sx, sy in zip(x, y) for u, v in zip(sx.logps, sy.logps)) < 1e-5


@engine
@pytest.mark.slow
def test_rlpt_train_with_rollout_backend_vllm_trains_with_the_logp_check(tmp_path, hf_dir):
    fast = [o for o in TINY_RL if not o.startswith(("model.", "sft."))]
    job = load_train_job(None, [*fast, "eval.every=100", "eval.size=8", f"run.out_dir={tmp_path / 'runs'}",
                                f"model.hf_path={hf_dir}", "rollout.backend=vllm", "steps=3"])
    ctl, run, _ = run_train(job)
    assert ctl.rollout.backend == "vllm" and isinstance(ctl.rollout._engine, VLLMBackend)
    rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("step/skipped") == 0.0]
    assert trained, "no step trained (all groups degenerate)"
    assert all(r["check/logp_mismatch"] < 1e-3 for r in trained)     # the check ran on vLLM's old_logp (and passed)
