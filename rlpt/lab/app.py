"""The lab's web app: `create_app(runs_dir)` -> FastAPI.

    GET /                       the 33 lessons, each with its widget or what is missing
    GET /lesson/<slug>          knobs, the result (fragment below), the rlpt source it runs, the course's notes
    GET /w/<slug>?knob=v...     the result as an HTML fragment (what the page's JavaScript swaps in)
    GET /api/<slug>?knob=v...   the result as JSON (tests, scripts)
    GET /runs                   run folders under runs_dir; /runs/<name> one run's curves and `rlpt diagnose`
    GET /runs/<name>/curves     the curves fragment (polled while the run trains)
    POST /jobs/<slug>?knob=v... a simulation (KIND = "simulation") started in the background -> {"id": ...};
    GET /jobs/<id>              {"state": running | done | error | cancelled, "progress": 0..1, "finished": the
                                worker has returned, "html" when done};
    DELETE /jobs/<id>           cancel it (the page does when a knob moves on)

Errors: a bad knob -> 400 {"error": "knob 'K' must be an integer 2..64, got 99"}; a setting the widget knows
would take too long -> 400 {"error": "refused: ..."}; a computation past TIME_LIMIT_S -> 503. A run name that is
not a folder directly under runs_dir (.., absolute paths, symlinks out) -> 404.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial
from html import escape
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from rlpt.lab import svg
from rlpt.lab.lessons import BY_SLUG, LESSONS
from rlpt.lab.widgets import KnobError, bounds, describe, load, parse_knobs, prepare, source_of

HERE = Path(__file__).parent
TIME_LIMIT_S = 10.0            # a widget computation longer than this is abandoned with a 503
JOB_LIMIT_S = 60.0             # a background job longer than this is stopped (at its next progress report)
MAX_JOBS = 16                  # jobs kept (finished ones are dropped first); at most 2 run at once
STATIC = {"lab.js": "application/javascript", "lab.css": "text/css"}
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# rlpt.framework.trainer.RATIO_BINS (not imported: it would import torch); tests/test_lab.py checks they agree
RATIO_BINS = (-1.0, -0.3, -0.1, -0.03, -0.01, 0.01, 0.03, 0.1, 0.3, 1.0)
CURVES = [("accuracy", ["acc/heldout", "acc/heldout_honest", "acc/train"]), ("reward", ["reward/mean"]),
          ("KL", ["kl/mean", "loss/kl"]), ("entropy", ["policy/entropy", "entropy/mean"]),
          ("clip fraction", ["clip/frac"]),
          ("seconds per role", ["time/rollout", "time/verify", "time/ref", "time/train", "time/sync"])]


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class JobStopped(Exception):
    """Raised from a job's progress callback: cancelled, or past JOB_LIMIT_S."""


@dataclass
class Job:
    slug: str
    started: float
    state: str = "running"          # running | done | error | cancelled
    progress: float = 0.0
    html: str = ""
    error: str = ""
    finished: bool = False          # the worker thread has returned (a cancelled job stops at its next report)

    def report(self, fraction: float) -> None:
        """The progress callback a simulation calls every step: records it, stops the job if asked to."""
        if self.state == "cancelled":
            raise JobStopped("cancelled")
        if time.monotonic() - self.started > JOB_LIMIT_S:
            raise JobStopped(f"stopped: this setting ran past {JOB_LIMIT_S:.0f} s; choose smaller knobs")
        self.progress = fraction

    def view(self) -> dict:
        out = {"state": self.state, "progress": round(self.progress, 4), "finished": self.finished}
        if self.state == "done":
            out["html"] = self.html
        if self.error:
            out["error"] = self.error
        return out


class Runs:
    """The run folders under one directory; nothing outside it is ever opened."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if RUN_NAME.fullmatch(p.name) and (p / "metrics.jsonl").is_file() and self.get(p.name))

    def get(self, name: str) -> Path | None:
        """The run folder `name`, or None if it is not a run folder directly under root."""
        if not RUN_NAME.fullmatch(name):
            return None
        p = (self.root / name).resolve()
        if p.parent != self.root or not (p / "metrics.jsonl").is_file():
            return None
        return p

    @staticmethod
    def rows(path: Path) -> list[dict]:
        out = []
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:   # a line being written right now
                continue
            if isinstance(row, dict):
                out.append(row)
        return out


def curves_fragment(rows: list[dict]) -> str:
    """One SVG per curve family that the run logged."""
    parts = []
    for title, keys in CURVES:
        series = {}
        for k in keys:
            pts = [(float(r.get("step", i)), float(r[k])) for i, r in enumerate(rows)
                   if isinstance(r.get(k), (int, float))]
            if pts:
                series[k] = pts
        if series:
            parts.append(f'<figure><figcaption>{escape(title)}</figcaption>'
                         f'{svg.line_chart(series, "step", title, title)}</figure>')
    hists = [r for r in rows if isinstance(r.get("ratio/hist"), list)]
    if hists and len(hists[-1]["ratio/hist"]) == len(RATIO_BINS) + 1:
        edges = [f"{e:g}" for e in RATIO_BINS]
        labels = [f"<{edges[0]}"] + [f"{a}..{b}" for a, b in zip(edges, edges[1:])] + [f">{edges[-1]}"]
        step = hists[-1].get("step", "?")
        parts.append(f'<figure><figcaption>log ρ histogram, step {escape(str(step))}</figcaption>'
                     f'{svg.bar_chart(labels, {"tokens": [float(x) for x in hists[-1]["ratio/hist"]]}, "tokens")}'
                     f'</figure>')
    last = rows[-1].get("step", len(rows) - 1) if rows else "-"
    head = f'<p class="meta">{len(rows)} rows, last step <b data-kpi="last step">{escape(str(last))}</b></p>'
    return head + ("".join(parts) or '<p class="empty">no curves logged yet</p>')


def diagnose_fragment(path: Path, rows: list[dict]) -> str:
    from rlpt.perf.configs import run_config
    from rlpt.perf.diagnose import diagnose
    try:
        cfg = run_config(path)
    except Exception:   # a run without a readable config.yaml: the checks that need it are skipped
        cfg = {}
    findings = diagnose(rows, cfg)
    if not findings:
        return '<p>rlpt diagnose: no findings.</p>'
    return svg.table(["finding", "severity", "evidence", "lesson", "fix"],
                     [[f.name, f.severity, f.evidence, f.lesson, f.fix] for f in findings])


def create_app(runs_dir: str | Path = "runs") -> FastAPI:
    app = FastAPI(title="rlpt lab", docs_url=None, redoc_url=None, openapi_url=None)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape())
    runs = Runs(runs_dir)
    busy = threading.BoundedSemaphore(4)   # at most 4 widget computations at once (2 cores)
    ready: set = set()                     # widget modules whose rlpt imports are done
    jobs: dict[str, Job] = {}

    def page(template: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(lessons=LESSONS, **ctx), status_code=status)

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    def widget(slug: str):
        lesson = BY_SLUG.get(slug)
        return (lesson, load(lesson.widget)) if lesson and lesson.widget else (lesson, None)

    async def run_widget(mod, params: dict[str, str]):
        """-> (knobs, result) or a JSONResponse naming what is wrong."""
        try:
            knobs = parse_knobs(mod.Knobs, params)
        except KnobError as e:
            return error(400, str(e))
        refusal = mod.limit(knobs) if hasattr(mod, "limit") else None
        if refusal:
            return error(400, f"refused: {refusal}")
        if not busy.acquire(blocking=False):
            return error(503, "refused: the lab is busy with 4 computations; try again in a moment")
        try:
            if mod not in ready:                   # first use: its imports, off the event loop, untimed
                await anyio.to_thread.run_sync(prepare, mod)
                ready.add(mod)
            compute = mod.compute
            if getattr(mod, "KIND", "calculator") == "simulation":   # it reports progress: stop it at the limit,
                deadline = time.monotonic() + TIME_LIMIT_S              # rather than leave a thread running on

                def stop_at_deadline(_: float) -> None:
                    if time.monotonic() > deadline:
                        raise JobStopped("past the time limit")
                compute = partial(mod.compute, progress=stop_at_deadline)
            with anyio.fail_after(TIME_LIMIT_S):
                result = await anyio.to_thread.run_sync(compute, knobs, abandon_on_cancel=True)
        except (TimeoutError, JobStopped):
            return error(503, f"refused: this setting took longer than {TIME_LIMIT_S:.0f} s; choose smaller knobs")
        except KnobError as e:
            return error(400, str(e))
        finally:
            busy.release()
        return knobs, result

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page("index.html", title="rlpt lab")

    @app.get("/lesson/{slug}", response_class=HTMLResponse)
    async def lesson_page(slug: str):
        lesson, mod = widget(slug)
        if lesson is None:
            return page("missing.html", 404, title="no such lesson", msg=f"no lesson {slug!r}")
        if mod is None:
            return page("lesson.html", title=lesson.title, lesson=lesson, mod=None)
        out = await run_widget(mod, {})
        if isinstance(out, Response):
            return out
        knobs, result = out
        fields = []
        for key, f in mod.Knobs.model_fields.items():
            extra = f.json_schema_extra or {}
            lo, hi = bounds(mod.Knobs, key)
            fields.append({"key": key, "label": f.description or key, "value": getattr(knobs, key), "lo": lo, "hi": hi,
                           "ann": describe(mod.Knobs, key), "type": f.annotation,
                           "step": extra.get("step", 1 if f.annotation is int else 0.01),
                           "options": list(getattr(f.annotation, "__args__", ()))})
        sources = [source_of(ref) for ref in mod.SOURCE]
        return page("lesson.html", title=lesson.title, lesson=lesson, mod=mod, fields=fields,
                    fragment=mod.render(result), sources=sources, bool=bool, str=str, int=int)

    @app.get("/w/{slug}")
    async def fragment(slug: str, request: Request):
        lesson, mod = widget(slug)
        if mod is None:
            return error(404, f"no widget for lesson {slug!r}")
        out = await run_widget(mod, dict(request.query_params))
        return out if isinstance(out, Response) else HTMLResponse(mod.render(out[1]))

    @app.get("/api/{slug}")
    async def api(slug: str, request: Request):
        lesson, mod = widget(slug)
        if mod is None:
            return error(404, f"no widget for lesson {slug!r}")
        out = await run_widget(mod, dict(request.query_params))
        return out if isinstance(out, Response) else JSONResponse(_jsonable(out[1]))

    def run_job(job: Job, mod, knobs) -> None:
        try:
            prepare(mod)
            html = mod.render(mod.compute(knobs, progress=job.report))
            if job.state == "running":          # not cancelled meanwhile
                job.html, job.progress, job.state = html, 1.0, "done"
        except JobStopped as e:
            job.error = "" if job.state == "cancelled" else str(e)
            job.state = job.state if job.state == "cancelled" else "error"
        except Exception as e:   # shown on the page, not swallowed: the widget has a bug
            job.state, job.error = "error", f"{type(e).__name__}: {e}"
        finally:
            job.finished = True

    @app.post("/jobs/{slug}")
    def start_job(slug: str, request: Request):
        lesson, mod = widget(slug)
        if mod is None or getattr(mod, "KIND", "calculator") != "simulation":
            return error(404, f"no simulation widget for lesson {slug!r}")
        try:
            knobs = parse_knobs(mod.Knobs, dict(request.query_params))
        except KnobError as e:
            return error(400, str(e))
        refusal = mod.limit(knobs) if hasattr(mod, "limit") else None
        if refusal:
            return error(400, f"refused: {refusal}")
        if sum(j.state == "running" for j in jobs.values()) >= 2:
            return error(503, "refused: 2 simulations are running; try again in a moment")
        for old in [i for i, j in jobs.items() if j.state != "running"][:max(0, len(jobs) + 1 - MAX_JOBS)]:
            del jobs[old]
        job_id = uuid.uuid4().hex[:12]
        jobs[job_id] = job = Job(slug, time.monotonic())
        threading.Thread(target=run_job, args=(job, mod, knobs), daemon=True).start()
        return JSONResponse({"id": job_id}, status_code=202)

    @app.get("/jobs/{job_id}")
    def job_status(job_id: str):
        job = jobs.get(job_id)
        return JSONResponse(job.view()) if job else error(404, f"no job {job_id!r}")

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            return error(404, f"no job {job_id!r}")
        if job.state == "running":
            job.state = "cancelled"
        return JSONResponse(job.view())

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page():
        return page("runs.html", title="runs", root=str(runs.root), names=runs.list())

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str):
        path = runs.get(name)
        if path is None:
            return page("missing.html", 404, title="no such run", msg=f"no run folder {name!r} under {runs.root}")
        rows = runs.rows(path)
        return page("run.html", title=name, name=name, curves=curves_fragment(rows),
                    findings=diagnose_fragment(path, rows))

    @app.get("/runs/{name}/curves", response_class=HTMLResponse)
    def run_curves(name: str):
        path = runs.get(name)
        if path is None:
            return error(404, f"no run folder {name!r} under the runs directory")
        return HTMLResponse(curves_fragment(runs.rows(path)))

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            return error(404, f"no static file {name!r}")
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name])

    return app
