// rlpt lab: the only JavaScript. A knob change -> GET /w/<slug>?<knobs> -> swap the result fragment in; for a
// simulation (data-kind), POST /jobs/<slug>?<knobs> and poll /jobs/<id> with a progress bar, cancelling the job
// a newer knob value replaces. A run page re-fetches its curves every 5 s while it is open.
// No libraries, no network beyond this server.
(function () {
  "use strict";
  var form = document.getElementById("knobs");
  var result = document.getElementById("result");
  var errorBox = document.getElementById("error");
  var bar = document.getElementById("progress");
  var timer = null, seq = 0, job = null;

  function query() {
    var parts = [];
    Array.prototype.forEach.call(form.elements, function (el) {
      if (!el.name) { return; }
      var v = el.type === "checkbox" ? (el.checked ? "true" : "false") : el.value;
      parts.push(encodeURIComponent(el.name) + "=" + encodeURIComponent(v));
    });
    return parts.join("&");
  }

  function show(ok, body) {
    if (ok) {
      errorBox.hidden = true;
      result.innerHTML = body;
    } else {
      errorBox.textContent = body;
      errorBox.hidden = false;
    }
  }

  function errorOf(text) {
    try { return JSON.parse(text).error; } catch (e) { return text; }
  }

  function runJob() {
    var mine = ++seq;
    if (job) { fetch("/jobs/" + job, {method: "DELETE"}); job = null; }
    fetch("/jobs/" + form.dataset.slug + "?" + query(), {method: "POST"}).then(function (r) {
      return r.text().then(function (body) { return {ok: r.ok, body: body}; });
    }).then(function (res) {
      if (mine !== seq) { return; }
      if (!res.ok) { show(false, errorOf(res.body)); return; }
      job = JSON.parse(res.body).id;
      bar.hidden = false;
      poll(job, mine);
    });
  }

  function poll(id, mine) {
    fetch("/jobs/" + id).then(function (r) { return r.json(); }).then(function (st) {
      if (mine !== seq) { return; }
      bar.value = st.progress;
      if (st.state === "running") { setTimeout(function () { poll(id, mine); }, 250); return; }
      bar.hidden = true;
      job = null;
      if (st.state === "done") { show(true, st.html); } else if (st.error) { show(false, st.error); }
    });
  }

  function refresh() {
    if (form.dataset.kind === "simulation") { runJob(); return; }
    var mine = ++seq;
    fetch("/w/" + form.dataset.slug + "?" + query()).then(function (r) {
      return r.text().then(function (body) { return {ok: r.ok, body: body}; });
    }).then(function (res) {
      if (mine !== seq) { return; }             // a newer request is on its way
      show(res.ok, res.ok ? res.body : errorOf(res.body));
    });
  }

  if (form) {
    form.addEventListener("input", function (ev) {
      var out = ev.target.parentNode.querySelector("output");
      if (out) { out.textContent = ev.target.value; }
      clearTimeout(timer);
      timer = setTimeout(refresh, 120);        // debounce: one request per pause in dragging
    });
  }

  var curves = document.getElementById("curves");
  if (curves && curves.dataset.poll) {
    setInterval(function () {
      fetch(curves.dataset.poll).then(function (r) { return r.ok ? r.text() : null; })
        .then(function (body) { if (body !== null) { curves.innerHTML = body; } });
    }, 5000);
  }
})();
