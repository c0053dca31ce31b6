"""Lesson 08 · "Multi-turn trajectory: tokens, mask, contribution to loss": rlpt.envs.calculator's tool-use trace
(the calculator answers the call for real) and its per-token response mask: 1 = the policy sampled it, 0 = the
tool wrote it. gpt_mini's tokenizer has one token per character, so the tiles below are the tokens.
"""
from __future__ import annotations

from html import escape

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Multi-turn trajectory: tokens, mask, contribution to loss"
SOURCE = ["rlpt.envs.calculator:tool_use_trace", "rlpt.envs.calculator:tool_reply"]
NOTES = [("course", "<123+456+789>: prompt 13 tokens, response 55 = assistant 30 + tool 6 + assistant 19; "
                    "49 of 55 are scored (mask 1). rlpt's agent loop records old_logp 0 at the tool's tokens."),
         ("course", "Breaking: mask the tool's tokens as 1 and the loss trains the policy to imitate the tool's "
                    "output (here 6 of 55 tokens' gradient, 11%, comes from text the policy never chose).")]


class Knobs(BaseModel):
    a: int = Field(123, ge=0, le=999, description="a")
    b: int = Field(456, ge=0, le=999, description="b")
    c: int = Field(789, ge=0, le=999, description="c")
    mask_tool: bool = Field(True, description="mask the tool's tokens (0)")


def compute(k: Knobs) -> dict:
    from rlpt.envs.calculator import tool_use_trace
    text, mask = tool_use_trace((k.a, k.b, k.c))
    prompt = f"<{k.a}+{k.b}+{k.c}>"
    tool = [i for i, m in enumerate(mask) if m == 0]
    scored = mask if k.mask_tool else [1.0] * len(mask)
    return {"prompt": prompt, "response": text, "mask": mask, "scored": scored, "prompt_len": len(prompt),
            "n_scored": int(sum(scored)), "n_tool": len(tool), "tool_share": sum(scored[i] for i in tool) / sum(scored)}


def render(r: dict) -> str:
    k = svg.kpis([("prompt tokens", str(r["prompt_len"])), ("response tokens", str(len(r["response"]))),
                  ("scored", f'{r["n_scored"]} of {len(r["response"])}'),
                  ("loss from tool tokens", f'{100 * r["tool_share"]:.0f}%')])
    tiles = "".join(f'<span class="tok {"tool" if m == 0 else "pol"}{"" if s else " off"}" '
                    f'title="mask {int(s)}">{escape(ch) if ch != " " else "&nbsp;"}</span>'
                    for ch, m, s in zip(r["response"], r["mask"], r["scored"]))
    legend = ('<p class="meta"><span class="tok pol">a</span> policy token (scored) '
              '<span class="tok tool off">7</span> tool output, mask 0 '
              '<span class="tok tool">7</span> tool output scored: the bug</p>')
    return k + f'<p><code>{escape(r["prompt"])}</code></p><div class="tiles">{tiles}</div>' + legend
