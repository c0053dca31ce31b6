// rlpt lab: the only JavaScript. A knob change -> GET /w/<slug>?<knobs> -> swap the result fragment in;
// a run page re-fetches its curves every 5 s while it is open. No libraries, no network beyond this server.
(function () {
  "use strict";
  var form = document.getElementById("knobs");
  var result = document.getElementById("result");
  var errorBox = document.getElementById("error");
  var timer = null, seq = 0;

  function query() {
    var parts = [];
    Array.prototype.forEach.call(form.elements, function (el) {
      if (!el.name) { return; }
      var v = el.type === "checkbox" ? (el.checked ? "true" : "false") : el.value;
      parts.push(encodeURIComponent(el.name) + "=" + encodeURIComponent(v));
    });
    return parts.join("&");
  }

  function refresh() {
    var mine = ++seq;
    fetch("/w/" + form.dataset.slug + "?" + query()).then(function (r) {
      return r.text().then(function (body) { return {ok: r.ok, body: body}; });
    }).then(function (res) {
      if (mine !== seq) { return; }             // a newer request is on its way
      if (res.ok) {
        errorBox.hidden = true;
        result.innerHTML = res.body;
      } else {
        var msg = res.body;
        try { msg = JSON.parse(res.body).error; } catch (e) { /* not JSON: show as is */ }
        errorBox.textContent = msg;
        errorBox.hidden = false;
      }
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
