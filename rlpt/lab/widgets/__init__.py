"""The widget contract and the helpers every widget page uses.

A widget module defines:
    TITLE                 the course widget's name
    KIND                  optional: "simulation" for a loop of training steps (default: a calculator, a formula)
    SOURCE                ["module:function", ...] the rlpt functions compute() calls (shown on the page)
    NOTES                 [(kind, text)], kind "course" (what the lesson says) or "fix" (⚠: the course's widget
                          was wrong; what rlpt gives instead and why)
    class Knobs(BaseModel) typed knobs with the course's ranges (Field ge/le) and defaults
    compute(knobs) -> dict   JSON-able numbers from rlpt's own functions; a simulation's compute also takes
                          `progress`, a callable it gives the fraction done (the lab's background jobs show it)
    render(result) -> str    an HTML fragment with its SVG plot
    limit(knobs) -> str | None   optional: why this setting would take too long (refused before running)
    IMPORTS               optional: more modules to import before the first computation (heavy ones)

Modules are imported on first use (`load`), so the index page never imports torch.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import typing
from types import ModuleType

from pydantic import BaseModel, ValidationError


def no_progress(fraction: float) -> None:
    """The default `progress` of a simulation's compute: nobody is watching."""


class KnobError(ValueError):
    """A knob value the widget refuses: the message names the knob and its range (HTTP 400)."""


def load(name: str) -> ModuleType:
    return importlib.import_module(f"rlpt.lab.widgets.{name}")


def prepare(mod: ModuleType) -> None:
    """Import the rlpt modules a widget runs (torch among them, for some) before its first computation, so the
    time limit measures the computation and not a one-off import."""
    for ref in [*mod.SOURCE, *getattr(mod, "IMPORTS", ())]:
        importlib.import_module(ref.partition(":")[0])
    if "torch" in sys.modules:   # the widgets' tensors are tiny: extra threads only contend (10x slower here)
        sys.modules["torch"].set_num_threads(1)


def bounds(model: type[BaseModel], key: str) -> tuple[float | None, float | None]:
    """(lo, hi) from a field's ge/le (or gt/lt) constraints."""
    lo = hi = None
    for m in model.model_fields[key].metadata:
        lo = getattr(m, "ge", getattr(m, "gt", getattr(m, "min_length", lo)))
        hi = getattr(m, "le", getattr(m, "lt", getattr(m, "max_length", hi)))
    return lo, hi


def describe(model: type[BaseModel], key: str) -> str:
    """What a knob accepts, for an error message: '2..64', 'true or false', 'one of a, b'."""
    ann = model.model_fields[key].annotation
    if ann is bool:
        return "true or false"
    if ann is str:
        return f"a text of at most {bounds(model, key)[1]} characters"
    if typing.get_origin(ann) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(ann)))
    lo, hi = bounds(model, key)
    kind = "an integer " if ann is int else "a number "
    return kind + (f"{lo}..{hi}" if lo is not None and hi is not None else "")


def parse_knobs(model: type[BaseModel], params: dict[str, str]) -> BaseModel:
    """Query parameters -> Knobs; any unknown, mistyped or out-of-range knob raises KnobError naming it."""
    unknown = sorted(set(params) - set(model.model_fields))
    if unknown:
        raise KnobError(f"unknown knob '{unknown[0]}': this widget's knobs are {', '.join(model.model_fields)}")
    try:
        return model(**params)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        if key in model.model_fields:
            raise KnobError(f"knob '{key}' must be {describe(model, key)}, got {params.get(key)!s}") from None
        raise KnobError(f"bad knobs: {err['msg']}") from None


def source_of(ref: str) -> tuple[str, str, str]:
    """'rlpt.perf.memory:kv_widget' -> (qualified name, file relative to the package root, source text), read
    from the installed package so the page always shows the code that ran."""
    mod_name, _, attr = ref.partition(":")
    obj: object = importlib.import_module(mod_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    path = inspect.getsourcefile(obj) or ""
    rel = path[path.rfind("rlpt/"):] if "rlpt/" in path else path
    line = inspect.getsourcelines(obj)[1] if attr else 1
    return ref, f"{rel}:{line}", inspect.getsource(obj)
