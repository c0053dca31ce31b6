"""rlpt lab through FastAPI's test client (no browser): every page answers, each widget's defaults give the
course's numbers (or rlpt's corrected value, named in its notes), the lesson's breaking setting breaks, a bad
knob is a 400 naming it, the runs dashboard reads nothing outside --runs, and the server binds loopback."""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from rlpt.lab.app import Runs, create_app  # noqa: E402
from rlpt.lab.cli import check_host  # noqa: E402
from rlpt.lab.lessons import LESSONS  # noqa: E402


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = root / "grpo_a"
    run.mkdir()
    rows = [{"step": s, "reward/mean": 0.1 * s, "acc/heldout": 0.05 * s, "loss/kl": 0.01 * s, "time/rollout": 1.0,
             "time/train": 0.5} for s in range(6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "not_a_run").mkdir()                                  # no metrics.jsonl: not listed, not served
    secret = tmp_path_factory.mktemp("outside")
    (secret / "metrics.jsonl").write_text('{"step": 0, "reward/mean": 42}\n')
    (root / "link_out").symlink_to(secret)                        # a symlink leading out of --runs
    return root


@pytest.fixture(scope="module")
def client(runs_dir):
    return TestClient(create_app(runs_dir))


def api(client, slug, **knobs):
    r = client.get(f"/api/{slug}", params=knobs)
    assert r.status_code == 200, r.text
    return r.json()


def test_index_lists_all_33_lessons(client):
    r = client.get("/")
    assert r.status_code == 200
    assert len(LESSONS) == 33
    for lesson in LESSONS:
        assert f'href="/lesson/{lesson.slug}"' in r.text
    assert "<script src=\"/static/lab.js\"></script>" in r.text and "http" not in r.text.split("<body>")[1]


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda x: x.slug)
def test_every_lesson_page(client, lesson):
    r = client.get(f"/lesson/{lesson.slug}")
    assert r.status_code == 200
    if lesson.widget:   # knobs, the result, the notes and the source read from the installed package
        assert 'id="knobs"' in r.text and 'id="result"' in r.text and 'data-kpi="' in r.text
        assert "<svg" in r.text or 'class="tiles"' in r.text                  # a plot, or lesson 08's token tiles
        assert "def " in r.text and "rlpt/" in r.text
    else:               # says what is missing; no made-up widget
        assert 'id="missing"' in r.text and lesson.missing.split(" ")[0] in r.text and 'id="knobs"' not in r.text


def test_unknown_lesson_and_widget_404(client):
    assert client.get("/lesson/99").status_code == 404
    assert client.get("/api/24").status_code == 404            # lesson 24 has no widget
    assert client.get("/static/../app.py").status_code == 404


# -- bad knobs: 400 naming the knob and its range ---------------------------------------------------------------
@pytest.mark.parametrize("slug,query,msg", [
    ("22b", {"k": 99}, "knob 'k' must be an integer 2..64, got 99"),
    ("20", {"seq": "abc"}, "knob 'seq' must be an integer 128..32768, got abc"),
    ("20", {"model": "13b"}, "knob 'model' must be one of 7b, 70b, got 13b"),
    ("22", {"checkpoint": "maybe"}, "knob 'checkpoint' must be true or false, got maybe"),
    ("10", {"eps": "nan"}, "knob 'eps' must be a number 0.01..0.5, got nan"),
    ("11", {"r0": 2}, "knob 'r0' must be an integer 0..1, got 2"),
    ("18a", {"bogus": 1}, "unknown knob 'bogus': this widget's knobs are strength, curation, k"),
    ("13", {"max_len": 64, "buffer": 128}, "refused: knob 'buffer' (128) must be <= knob 'max_len' (64)"),
    ("17", {"agg": "sum"}, "knob 'agg' must be one of min, prod, last, got sum"),
    ("21", {"slots": 0}, "knob 'slots' must be an integer 1..32, got 0"),
    ("21", {"kv_blocks": 3}, "knob 'kv_blocks' (3): num_blocks=3 cannot hold one sequence of model.max_seq_len=64 "
                             "tokens: need >= 5 blocks of 16"),                # the engine's own refusal
])
def test_bad_knob_is_a_400_naming_it(client, slug, query, msg):
    for route in ("api", "w"):
        r = client.get(f"/{route}/{slug}", params=query)
        assert r.status_code == 400 and r.json() == {"error": msg}


def wait_job(client, job_id, timeout=30.0):
    import time
    seen = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = client.get(f"/jobs/{job_id}").json()
        seen.append(st["progress"])
        if st["finished"]:
            return st, seen
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def test_simulation_runs_as_a_background_job_with_progress(client):
    r = client.post("/jobs/01", params={"steps": 400, "seed": 3})
    assert r.status_code == 202
    st, seen = wait_job(client, r.json()["id"])
    assert st["state"] == "done" and st["progress"] == 1.0 and 'data-kpi="π(C)"' in st["html"]
    assert seen == sorted(seen)                                            # progress only moves forward
    same = client.get("/api/01", params={"steps": 400, "seed": 3}).json()   # the same numbers as the direct call
    assert f'{same["pi_c"]:.3f}' in st["html"]


def test_jobs_validate_cancel_and_refuse(client):
    bad = client.post("/jobs/01", params={"eta": 5})
    assert bad.status_code == 400 and bad.json() == {"error": "knob 'eta' must be a number 0.01..2.0, got 5"}
    assert client.post("/jobs/16", params={"steps": 20000}).status_code == 400
    assert client.post("/jobs/20").status_code == 404                     # a calculator answers directly
    assert client.get("/jobs/nope").status_code == 404 and client.delete("/jobs/nope").status_code == 404
    job_id = client.post("/jobs/09", params={"trials": 200}).json()["id"]
    assert client.delete(f"/jobs/{job_id}").json()["state"] == "cancelled"
    st, _ = wait_job(client, job_id)
    assert st["state"] == "cancelled" and "html" not in st


def test_a_computation_past_the_time_limit_is_stopped(monkeypatch, runs_dir):
    from rlpt.lab import app
    monkeypatch.setattr(app, "TIME_LIMIT_S", 0.2)
    c = TestClient(create_app(runs_dir))
    assert c.get("/api/20").status_code == 200                             # a calculator: well inside
    r = c.get("/api/09", params={"trials": 200})                           # ~2 s of estimates
    assert r.status_code == 503 and r.json()["error"].startswith("refused: this setting took longer than")


def test_too_long_a_request_is_refused_before_running(client):
    r = client.get("/api/16", params={"steps": 20000})
    assert r.status_code == 400 and r.json()["error"].startswith("refused: 20000 steps")
    assert "at most 2000" in r.json()["error"]


# -- each widget at the course's defaults ------------------------------------------------------------------------
def test_l01_bandit_trained_by_rlpt_reinforce(client):
    r = api(client, "01")
    assert r["argmax"] == "C" and r["pi_c"] == pytest.approx(0.98, abs=0.01)   # η 0.4, 200 steps
    assert all(api(client, "01", seed=s)["argmax"] == "C" for s in range(1, 6))
    # breaking: η 2.0 locks some runs onto a wrong arm (course: 10 %; here seeds 16 and 18 of 10..19)
    assert any(api(client, "01", eta=2.0, seed=s)["argmax"] != "C" for s in range(10, 20))


def test_l02_sampling(client):
    r = api(client, "02")
    assert r["p_digit"] == pytest.approx(0.7, abs=1e-5) and r["p_correct"] == pytest.approx(0.49, abs=1e-5)
    assert r["degenerate_p"] == pytest.approx(0.49 ** 4 + 0.51 ** 4)  # K = 4 at T = 1: the course's 0.125
    assert len(r["trajs"]) == 4
    # real temperature sharpens: T = 0.5 squares the odds (0.7² / (0.7² + 9 (0.3/9)²) = 0.98)
    assert api(client, "02", temperature=0.5)["p_digit"] == pytest.approx(0.98, abs=1e-4)
    assert api(client, "02", k=2, temperature=0.5)["degenerate_p"] > 0.85     # breaking: low T, K = 2
    top1 = api(client, "02", top_k=1)
    assert top1["p_digit"] == pytest.approx(1.0) and all(t["reward"] == 1 for t in top1["trajs"])


def test_l03_verifier_and_kl_anchor(client):
    r = api(client, "03")
    assert (r["answer"], r["reward"], r["hacked"]) == (12, 1.0, False)
    hack = api(client, "03", response="120#")
    assert (hack["answer"], hack["reward"], hack["leaky_reward"], hack["hacked"]) == (120, 0.0, 1.0, True)
    assert r["exp_reward"] == pytest.approx(1.0, abs=1e-6)              # β 0.05: all mass on the right answers
    assert r["kl"] == pytest.approx(math.log(1 / 0.2), abs=1e-4)        # = log 1/π_ref(right)
    anchored = api(client, "03", beta=1.0)
    assert anchored["exp_reward"] < 0.45 and anchored["kl"] < 0.15       # large β: close to π_ref (reward 0.2)
    r = client.get("/api/03", params={"response": "x" * 201})
    assert r.status_code == 400 and r.json()["error"].startswith("knob 'response' must be a text of at most 200")


def test_l04_advantages(client):
    r = api(client, "04")                                                  # rewards (0, 0, 1)
    assert r["adv"]["reinforce"] == [0, 0, 1]
    assert r["adv"]["drgrpo"] == pytest.approx([-1 / 3, -1 / 3, 2 / 3], abs=1e-6)
    assert r["adv"]["rloo"] == pytest.approx([-0.5, -0.5, 1.0], abs=1e-6)
    assert r["course_grpo"] == pytest.approx([-0.707, -0.707, 1.414], abs=1e-3)   # the course (÷K std)
    assert r["adv"]["grpo"] == pytest.approx([-0.577, -0.577, 1.155], abs=1e-3)   # rlpt (unbiased std)
    broken = api(client, "04", r0=1, r1=1, r2=1)
    assert broken["degenerate"] and broken["adv"]["grpo"] == [0, 0, 0]


@pytest.mark.parametrize("shift,pg,k3,frac", [(0.0, 0.0, 0.0077651, 0.0), (0.3, 0.05320, 0.03361, 1.0),
                                              (-0.3, 0.02101, 0.07783, 1.0)])
def test_l05_loss_assembly(client, shift, pg, k3, frac):
    r = api(client, "05", shift=shift)
    assert r["pg"] == pytest.approx(pg, abs=1e-5) and r["kl"] == pytest.approx(k3, abs=1e-5)
    assert r["kl_loss"] == pytest.approx(0.05 * k3, abs=1e-6) and r["clip_frac"] == frac
    assert len(r["rows"]) == 8


@pytest.mark.parametrize("every,frac,ema", [(1, 0.0, 0.88), (3, 0.035, 0.88), (5, 0.145, 0.88), (10, 0.5, 0.86),
                                            (20, 0.885, 0.58), (40, 0.95, 0.33)])
def test_l06_stale_sync(client, every, frac, ema):
    r = api(client, "06", sync_every=every)
    assert r["frac_clipped"] == pytest.approx(frac) and r["reward_ema"] == pytest.approx(ema, abs=0.005)


def test_l07_a_real_controller_step(client):
    r = api(client, "07")                                                  # leaky verifier, K 3, 4 prompts
    m = r["metrics"]
    assert m["step/skipped"] == 0 and m["sync/done"] == 1 and "loss/pg" in m
    assert all(m[f"time/{p}"] >= 0 for p in ("rollout", "verify", "ref", "train", "sync"))
    assert len(r["rows"]) == 12 and any(row[3] > 0 for row in r["rows"])
    # breaking: every group degenerate. An untrained policy's samples decide it, and they move with the CPU, so
    # the first seed that skips is searched for (here 4 of 12 seeds skip: 4, 6, 10, 11; none in 16 would be a
    # chance of ~0.2 % at that rate), and what a skipped step must look like is asserted on it.
    for seed in range(16):
        skipped = api(client, "07", env="arithmetic", seed=seed)["metrics"]
        if skipped["step/skipped"] == 1:
            break
    assert skipped["step/skipped"] == 1, "no seed in 0..15 gave an all-degenerate step on the honest verifier"
    assert "loss/pg" not in skipped and "time/train" not in skipped


def test_l08_tool_mask(client):
    r = api(client, "08")
    assert r["prompt_len"] == 13 and len(r["response"]) == 55
    assert r["mask"] == [1.0] * 30 + [0.0] * 6 + [1.0] * 19 and r["n_scored"] == 49
    assert r["response"][30:36] == "=1368#" and r["tool_share"] == 0              # the calculator's real reply
    bug = api(client, "08", mask_tool="false")
    assert bug["n_scored"] == 55 and bug["tool_share"] == pytest.approx(6 / 55)
    assert "=1000#" in api(client, "08", a=999, b=1, c=0)["response"]


def test_l09_estimator_noise_falls_as_one_over_sqrt_k(client):
    r = api(client, "09", trials=100)
    rf, rl = dict(r["error"]["REINFORCE"]), dict(r["error"]["RLOO baseline"])
    assert 3.0 < rf[1] / rf[16] < 5.5                                      # √16 = 4
    assert all(rl[k] < rf[k] for k in (4, 8, 16, 32))                     # the baseline cuts it again


def test_l10_clip_table(client):
    cells = {(c["rho"], c["A"]): c for c in api(client, "10")["cells"]}
    assert cells[(0.7, 1)]["flows"] and not cells[(0.7, -1)]["flows"]
    assert not cells[(1.4, 1)]["flows"] and cells[(1.4, -1)]["flows"]
    assert cells[(1.0, 1)]["flows"] and cells[(1.0, -1)]["flows"]
    assert cells[(1.4, 1)]["objective"] == pytest.approx(1.2) and cells[(0.7, -1)]["objective"] == pytest.approx(-0.8)
    assert cells[(1.4, -1)]["grad"] == pytest.approx(1.4)                # −∂(ρA)/∂logρ = ρ for A = −1
    wide = {(c["rho"], c["A"]): c for c in api(client, "10", eps=0.5)["cells"]}
    assert all(c["flows"] for c in wide.values())                        # ε 0.5: no cell leaves the band


def test_l11_grpo(client):
    r = api(client, "11")                                                  # [1, 0, 1, 0]
    assert r["adv"] == pytest.approx([0.866, -0.866, 0.866, -0.866], abs=1e-3)
    assert r["course"] == pytest.approx([1, -1, 1, -1], abs=1e-5)
    outlier = api(client, "11", r0=1, r1=0, r2=0, r3=0)
    assert outlier["adv"] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert outlier["course"][0] == pytest.approx(1.732, abs=1e-3)
    same = api(client, "11", r0=1, r1=1, r2=1, r3=1)
    assert same["degenerate"] and same["adv"] == [0, 0, 0, 0]


def test_l12_rloo(client):
    r = api(client, "12")
    assert r["k_over"] == pytest.approx(4 / 3)
    assert all(q is None or q == pytest.approx(4 / 3, abs=1e-5) for q in r["ratio"])
    assert api(client, "12", k=2, seed=1)["k_over"] == 2
    dead = api(client, "12", accuracy=1.0)
    assert dead["degenerate"] and dead["rloo"] == [0] * 4 and dead["grpo"] == [0] * 4


def test_l13_dapo(client):
    r = api(client, "13")
    assert r["degenerate"] == pytest.approx(0.125)
    assert api(client, "13", p=0.9, k=4)["degenerate"] == pytest.approx(0.9 ** 4 + 0.1 ** 4)
    assert r["obj_sym"] == pytest.approx(1.2, abs=1e-6) and r["obj_high"] == pytest.approx(1.25, abs=1e-6)
    pen = dict(r["penalty"])
    assert pen[0] == 0 and pen[1024] == 1 and pen[768] == 0 and pen[896] == pytest.approx(0.5)


def test_l14_drgrpo(client):
    m = api(client, "14")["modes"]
    assert m["GRPO"]["ratio"] == pytest.approx(0.05)                     # "5.0 %"
    assert m["GRPO"]["short"] == pytest.approx(0.025)                    # the course prints 0.0500 (no 1/K)
    assert m["DAPO"]["short"] == m["DAPO"]["long"] == pytest.approx(0.5 / 210)
    assert m["Dr.GRPO"]["short"] == m["Dr.GRPO"]["long"] == pytest.approx(0.25)
    assert api(client, "14", y_long=500)["modes"]["GRPO"]["ratio"] == pytest.approx(0.02)   # breaking


def test_l15_bradley_terry(client):
    """8 seeds × 500 pairs: η 0.05 orders all four (course: 97 %); η 1.0 keeps swapping C/D (course: ≈40 %)."""
    calm = [api(client, "15", eta=0.05, steps=500, seed=s) for s in range(8)]
    wild = [api(client, "15", eta=1.0, steps=500, seed=s) for s in range(8)]
    assert sum(r["ordered"] for r in calm) >= 7 and sum(r["ordered"] for r in wild) <= 4
    assert sum(r["agreement"] for r in calm) / 8 > 0.95 > 0.9 > sum(r["agreement"] for r in wild) / 8


def test_l16_dpo(client):
    r = api(client, "16")
    assert r["closed_form"][3] == pytest.approx(0.702, abs=5e-4)
    assert r["pi"][3] == pytest.approx(r["closed_form"][3], abs=2e-3)   # trained by rlpt's dpo_loss
    assert r["gap_DA"] == pytest.approx(2.5, abs=0.02)
    assert r["ipo_min"] == pytest.approx(1.0)
    diffuse = api(client, "16", beta=2.0)
    assert diffuse["closed_form"][3] == pytest.approx(0.394, abs=5e-4)


def test_l17_search_on_rlpt_search(client):
    r = api(client, "17")                                # p_good 0.75, N 16, ORM flip 0.10, PRM flip 0.15, 500 trials
    a = r["accuracy"]
    assert r["greedy_closed"] == 0.75 ** 6 and r["pass_at_n_closed"] == pytest.approx(0.9565, abs=1e-4)
    assert r["orm_course"] == pytest.approx(0.653, abs=5e-4)               # the course's (1−(1−0.242)^16)·0.661
    assert r["orm_closed"] == pytest.approx(0.6533, abs=5e-4)              # + the tie term it leaves out
    # pure-Python draws: exact on any CPU
    # (the problems come from task.sample's training split, the multiset split since 3081d94)
    assert a == {"one sample": 0.134, "oracle BoN": 0.954, "majority": 0.25, "BoN-ORM": 0.614,
                 "BoN-PRM": 0.674, "weighted PRM": 0.678}
    sd = math.sqrt(0.25 / 500)                                             # the measured rates vs closed forms
    assert abs(a["one sample"] - r["greedy_closed"]) < 3 * sd and abs(a["BoN-ORM"] - r["orm_closed"]) < 3 * sd
    assert abs(a["oracle BoN"] - r["pass_at_n_closed"]) < 3 * sd
    assert a["oracle BoN"] == max(a.values())                    # the oracle is the ceiling
    chance = api(client, "17", prm_flip=0.5)["accuracy"]                   # breaking: a PRM at chance
    assert chance["one sample"] == a["one sample"] and chance["majority"] == a["majority"]   # the same candidates
    assert abs(chance["BoN-PRM"] - a["one sample"]) < 3 * sd and chance["BoN-PRM"] < chance["majority"]
    perfect = api(client, "17", prm_flip=0.0, orm_flip=0.0)["accuracy"]
    assert perfect["BoN-PRM"] == perfect["BoN-ORM"] == perfect["oracle BoN"]
    refused = client.get("/api/17", params={"n": 64, "trials": 2000})
    assert refused.status_code == 400 and refused.json()["error"].startswith("refused: N · trials = 128000")


def test_l21_scheduling_on_the_real_engine(client):
    r = api(client, "21")          # 16 requests (4 long of 40 tokens, 12 short of 4), 8 slots, budget 64
    assert r["lengths"].count(40) == 4 and sum(r["lengths"]) == 208
    c, s = r["continuous"], r["static"]
    assert c["generated"] == s["generated"] == r["spec"]["generated"] == 208
    # ignore_eos: the step counts do not depend on the sampled tokens (exact on any CPU)
    assert (c["steps"], s["steps"]) == (48, 80) and r["static_over_continuous"] == pytest.approx(80 / 48)
    assert s["slot_use"] == pytest.approx(208 / (8 * 80)) and c["preemptions"] == 0
    assert 0.5 < r["acceptance"] < 1 and r["course_accept"] == pytest.approx(0.51)
    same = api(client, "21", draft_noise=0.0)                              # draft = target: every draft accepted
    assert same["acceptance"] == 1.0 and same["per_verify_formula"] == 5.0 and same["spec"]["steps"] == 13
    worse = [api(client, "21", draft_noise=x)["acceptance"] for x in (0.5, 1.0, 2.0)]
    assert worse == sorted(worse, reverse=True) and worse[-1] < 0.7       # a worse draft, fewer accepted
    assert api(client, "21", long_frac=0.0)["static_over_continuous"] == 1.0   # no tail: nothing to gain
    tight = api(client, "21", kv_blocks=6)                                 # breaking: the pool preempts
    assert tight["continuous"]["preemptions"] >= 1 and tight["continuous"]["recompute"] > 0
    assert tight["continuous"]["steps"] > c["steps"]
    refused = client.get("/api/21", params={"requests": 48, "short_len": 48})
    assert refused.status_code == 400 and refused.json()["error"].startswith("refused: 6624 tokens")  # 3·(12·40+36·48)


def test_l18_reward_hacking(client):
    honest = [api(client, "18", rho=0, steps=300, seed=s) for s in range(4)]
    leaky = [api(client, "18", rho=0.5, steps=300, seed=s) for s in range(4)]
    assert min(r["p_solve"] for r in honest) > 0.85 and max(r["p_solve"] for r in leaky) < 0.3
    c = honest[0]["checklist"]                                             # checklist 1: a random baseline
    assert c["honest"] < 0.02 and c["leaky"] > 0.1


def test_l18a_signal(client):
    r = api(client, "18a")
    assert r["kept"] == 1000 and r["signal_course"] == pytest.approx(120.5, abs=0.05)
    assert r["wasted"] == pytest.approx(0.420, abs=5e-4) and r["signal_per_flop"] == pytest.approx(1.51, abs=5e-3)
    assert r["signal_rlpt"] == pytest.approx(r["signal_course"] * 7 / 8)
    assert api(client, "18a", strength=80)["wasted"] == pytest.approx(0.420, abs=5e-4)     # symmetric
    cur = api(client, "18a", strength=80, curation=80)
    assert cur["kept"] == 160 and cur["wasted"] == pytest.approx(0.014, abs=5e-4)
    assert cur["signal_course"] == pytest.approx(38.9, abs=0.05)
    assert cur["signal_per_flop"] == pytest.approx(3.04, abs=5e-3)
    assert api(client, "18a", strength=0)["wasted"] == pytest.approx(0.548, abs=5e-4)
    assert api(client, "18a", k=2)["wasted"] == pytest.approx(0.759, abs=5e-4)
    assert api(client, "18a", k=32)["wasted"] == pytest.approx(0.225, abs=5e-4)


def test_l19_topology(client):
    r = api(client, "19")
    assert [round(r["steps_per_hour"][t]) for t in ("colocated", "disaggregated", "async")] == [97, 164, 180]
    assert r["async_vs_colocated"] == pytest.approx(1.85)


def test_l20_kv(client):
    r = api(client, "20")
    assert r["kv_per_token"] == 131_072 and r["total_gib"] == 8.0 and r["free_gb"] == 66
    assert r["step_ms"] == pytest.approx(2.39, abs=0.01) and r["bottleneck"] == "weight bandwidth dominates KV"
    assert api(client, "20", batch=256, seq=4096)["bottleneck"].startswith("HBM capacity")
    assert not api(client, "20", seq=4224, gqa="false")["bottleneck"].startswith("HBM")
    assert api(client, "20", seq=4352, gqa="false")["bottleneck"].startswith("HBM")
    assert api(client, "20", model="70b", batch=1, seq=128)["free_gb"] == 0


def test_l20_paged_blocks_from_the_block_manager(client):
    r = api(client, "20")                                                  # P 160, G 32, K 16, 16-token blocks
    assert r["paged_used"] == r["paged_formula"] == 10 + 16 * 2 and r["paged_copied"] == 16 * 12
    assert r["cow_copies"] == 0 and all(t[:10] == r["tables"][0][:10] for t in r["tables"])   # shared prefix
    part = api(client, "20", prompt=150, completion=20)                    # 6 tokens in a partial prompt block
    assert part["paged_used"] == part["paged_formula"] == 9 + 16 * 2 and part["cow_copies"] == 15


def test_l22_memory(client):
    r = api(client, "22")
    assert r["train_gb"] == pytest.approx(32.9, abs=0.05) and r["infer_gb"] == pytest.approx(2.3, abs=0.05)
    assert r["kv_per_token"] == 131_072 and r["fits"]
    assert api(client, "22", checkpoint="false")["train_gb"] == pytest.approx(153, abs=0.5)
    big = api(client, "22", size_b=70, gpus=64)
    assert big["train_gb"] == pytest.approx(94.8, abs=0.05) and not big["fits"]


def test_l22a_roles(client):
    r = api(client, "22a")
    assert r["roles"]["rollout"] == pytest.approx(10.08, abs=0.01)
    assert r["roles"]["train"] == pytest.approx(2.097, abs=1e-3)
    assert r["step_s"] == pytest.approx(12.38, abs=0.01) and r["tok_s"] == pytest.approx(84_700, abs=100)
    assert r["rollout_share"] == pytest.approx(0.81, abs=0.01)
    assert api(client, "22a", as_stated="true")["step_s"] == pytest.approx(42.6, abs=0.05)   # the correction
    assert api(client, "22a", length=8192)["rollout_share"] > 0.9


def test_l22b_straggler(client):
    r = api(client, "22b")
    assert r["max_len"] == pytest.approx(800 * 5.0226, abs=0.1) and r["tax"] == pytest.approx(4.02, abs=5e-3)
    assert r["double_k"] == pytest.approx(0.26, abs=5e-3)              # the course said "about 15 %"
    assert api(client, "22b", k=64, cv=2.0)["max_len"] / 800 == pytest.approx(17.4, abs=0.05)


def test_l22c_async(client):
    r = api(client, "22c")
    assert r["per_topology"] == {"colocated": 31, "disaggregated": 23, "async": 20}
    assert r["clip"] == 0
    assert api(client, "22c", topology="async", staleness=8)["clip"] == pytest.approx(0.33, abs=5e-3)


def test_l25_kernels(client):
    r = api(client, "25")
    assert r["sharing"] == pytest.approx(6.15, abs=0.01)
    assert api(client, "25", k=64)["sharing"] == pytest.approx(8.65, abs=0.01)
    assert r["logits_gb"] == pytest.approx(8.4, abs=0.05) and r["naive_peak_gb"] == pytest.approx(16.8, abs=0.1)
    assert r["chunked_mb"] == pytest.approx(67.1, abs=0.1)                # "≈ 64 MB" (MiB) with 1k-vocab chunks
    assert api(client, "25", chunk=4096)["chunk_factor"] == pytest.approx(31.25)   # "V_chunk = 4k → 32×"


def test_l27_kl(client):
    r = api(client, "27", samples=20000)
    assert r["k1"]["bias"] == pytest.approx(0, abs=1e-6) and r["k3"]["bias"] == pytest.approx(0, abs=1e-6)
    assert r["k2"]["bias"] > 0.01                                          # biased at this drift
    assert r["k3"]["min"] >= 0 and r["k2"]["min"] >= 0
    assert r["k1"]["mean"] == pytest.approx(r["exact"], abs=0.03)
    assert r["k3"]["mean"] == pytest.approx(r["exact"], abs=0.03)
    few = [api(client, "27", samples=2, seed=s)["k1"]["min"] for s in range(5)]
    assert min(few) < 0                                                    # k1 is signed


def test_l28_allocator(client):
    r = api(client, "28")
    assert r["baseline"] == 100 and r["total"] == pytest.approx(43.92) and r["speedup"] == pytest.approx(2.28, abs=5e-3)
    on = api(client, "28", speculative_decoding="true", fp8_rollout="true", async_overlap="true",
             separate_ref_pool="true")
    assert on["total"] == pytest.approx(21.58, abs=5e-3) and on["largest"] == "train"
    assert api(client, "28", rollout=90, train=50)["baseline"] == 155     # sliders past 100


def test_fragment_is_html_with_svg(client):
    r = client.get("/w/20", params={"batch": 64})
    assert r.status_code == 200 and "<svg" in r.text and 'data-kpi="KV total"' in r.text and "16.0 GiB" in r.text


# -- runs dashboard ------------------------------------------------------------------------------------------
def test_runs_dashboard_lists_and_plots(client):
    r = client.get("/runs")
    assert r.status_code == 200 and "grpo_a" in r.text and "not_a_run" not in r.text and "link_out" not in r.text
    page = client.get("/runs/grpo_a")
    assert page.status_code == 200 and page.text.count("<svg") >= 4 and "rlpt diagnose" in page.text
    assert 'data-poll="/runs/grpo_a/curves"' in page.text
    frag = client.get("/runs/grpo_a/curves")
    assert 'data-kpi="last step">5<' in frag.text


@pytest.mark.parametrize("name", ["%2E%2E", "..%2F..%2Fetc%2Fpasswd", "%2Fetc", "not_a_run", "link_out", ".hidden",
                                  "grpo_a%2F..%2F..", "~root"])
def test_path_traversal_refused(client, name):
    for path in (f"/runs/{name}", f"/runs/{name}/curves"):
        r = client.get(path)
        assert r.status_code == 404
        assert "42" not in r.text


def test_ratio_histogram_and_real_run(tmp_path):
    """The diagnose fixture's real reward-hacking run: its curves, its log-ρ histogram and its findings."""
    import shutil

    from rlpt.framework.trainer import RATIO_BINS
    from rlpt.lab import app
    assert app.RATIO_BINS == RATIO_BINS
    shutil.copytree(Path(__file__).parent / "data" / "diagnose" / "hack", tmp_path / "hack")
    page = TestClient(create_app(tmp_path)).get("/runs/hack")
    assert page.status_code == 200 and "log ρ histogram" in page.text and "reward hacking" in page.text


def test_runs_get_confines_to_root(runs_dir):
    runs = Runs(runs_dir)
    assert runs.get("grpo_a") == (runs_dir / "grpo_a").resolve()
    for bad in ("..", "../outside", "/etc", "grpo_a/../..", "link_out", "", "a\x00b"):
        assert runs.get(bad) is None


def test_runs_missing_dir_is_empty(tmp_path):
    c = TestClient(create_app(tmp_path / "nope"))
    assert c.get("/runs").status_code == 200 and "No run folders" in c.get("/runs").text


# -- binding ------------------------------------------------------------------------------------------------
def test_loopback_default_and_remote_needs_the_flag():
    from rlpt.cli import build_parser
    from rlpt.config import ConfigError
    args = build_parser().parse_args(["lab"])
    assert (args.host, args.port, args.runs, args.allow_remote) == ("127.0.0.1", 8765, "runs", False)
    assert check_host("127.0.0.1", False) is None and check_host("localhost", False) is None
    assert check_host("::1", False) is None
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    assert "WARNING" in check_host("0.0.0.0", True)


def test_rlpt_lab_refuses_remote_bind_with_one_line(capsys):
    from rlpt.cli import main
    assert main(["lab", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlpt lab: error: --host 0.0.0.0 is not a loopback address") and "\n" not in err


def test_server_binds_loopback_only():
    """Start the real server (uvicorn, default host) on a free port: it answers on 127.0.0.1 and the listening
    socket's address is the loopback one, not 0.0.0.0."""
    import threading
    import time

    import httpx
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from rlpt.cli import build_parser
    host = build_parser().parse_args(["lab"]).host
    server = uvicorn.Server(uvicorn.Config(create_app("runs"), host=host, port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        bound = {sock.getsockname()[0] for srv in server.servers for sock in srv.sockets}
        assert bound == {"127.0.0.1"}
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    finally:
        server.should_exit = True
        t.join(10)


def test_rlpt_lab_starts_without_torch():
    """`rlpt lab` answers within 3 s of start: nothing on its path to serving (the CLI's parser with every command
    registered, main's error classes, the app with every lesson page) imports torch; a widget imports it when run."""
    import subprocess
    import sys
    code = ("import sys, rlpt.cli, rlpt.errors\nrlpt.cli.build_parser()\nfrom rlpt.lab.app import create_app\n"
            "from fastapi.testclient import TestClient\nc = TestClient(create_app())\n"
            "assert c.get('/').status_code == 200\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
