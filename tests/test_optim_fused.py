"""rlpt.optim.make_optimizer runs torch's fused AdamW (issue 14): the same update as the for-loop AdamW to float
rounding, and the state dicts load across the two kinds (a checkpoint from before the switch resumes)."""
import torch

from rlpt.config import OptimConfig
from rlpt.optim import make_optimizer

from conftest import tiny_gpt


def _steps(model, opt, n=3):
    for i in range(n):
        torch.manual_seed(100 + i)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_fused_adamw_matches_the_loop_and_loads_its_state():
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    a, b = tiny_gpt(), tiny_gpt()
    opt, _ = make_optimizer(a, cfg, 10)
    assert opt.defaults["fused"]
    loop = torch.optim.AdamW(b.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    _steps(a, opt)
    _steps(b, loop)
    gap = max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))
    moved = max((x - y).abs().max().item() for x, y in zip(a.parameters(), tiny_gpt().parameters()))
    assert gap <= 1e-6 < 1e-3 < moved                      # 3 steps of lr 1e-2 moved the weights; the kinds agree
    # the loop's state resumes in the fused optimizer: the next steps agree as well
    resumed, _ = make_optimizer(b, cfg, 10)
    resumed.load_state_dict(loop.state_dict())
    _steps(a, opt, 2)
    _steps(b, resumed, 2)
    assert max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters())) <= 2e-6
