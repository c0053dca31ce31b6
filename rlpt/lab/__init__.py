"""`rlpt lab`: the course's widgets, live on rlpt's own code, in the browser (issue 20).

One page per lesson (33: 00–28 with 18a and 22a/b/c). A lesson's widget is a module in `rlpt/lab/widgets/`:
typed knobs (the course's ranges and defaults), `compute` calling the rlpt functions the lesson is about, `render`
drawing the result as an HTML fragment with a server-drawn SVG, and `NOTES` naming what the course's widget got
wrong (⚠ in the spec) and what rlpt prints instead. The page shows the source of the functions the widget runs,
read from the installed package, so it is always current. A dashboard reads the run folders under `--runs`.

    rlpt lab [--port 8765] [--host 127.0.0.1] [--runs runs]        then open http://127.0.0.1:8765/

Stack (shared/research/wave2.md §5): FastAPI + Jinja2 + hand-drawn SVG + ~60 lines of our own JavaScript; no
CDN, works offline. torch is imported only when a widget that needs it is first used.
"""
