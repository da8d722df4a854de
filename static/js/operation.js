// The operation page: live over /ws/operations/<id>/, polling the API while the socket is down.
// Progress bar, phases, the event log and (for a migration) bytes moved over time.
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  const root = document.getElementById("operation");
  if (!root) return;
  const id = root.dataset.id;
  const apiUrl = root.dataset.api;
  const list = document.getElementById("op-events");
  const live = document.getElementById("op-live");
  const phaseList = document.getElementById("op-phases");
  const seen = new Set();
  list.querySelectorAll("li[data-seq]").forEach(function (li) { seen.add(li.dataset.seq); });
  let terminal = ["success", "failure", "cancelled"].indexOf(document.getElementById("op-status").textContent) >= 0;
  let pollTimer = null;

  function setState(op) {
    const was = terminal;
    const status = document.getElementById("op-status");
    status.textContent = op.status;
    status.className = "status status-" + op.status;
    document.getElementById("op-phase").textContent = op.phase;
    document.getElementById("op-progress").textContent = op.progress + "%";
    document.getElementById("op-bar").style.width = op.progress + "%";
    document.getElementById("op-progressbar").setAttribute("aria-valuenow", op.progress);
    const err = document.getElementById("op-error");
    if (op.error) { err.textContent = op.error; err.hidden = false; }
    const result = document.getElementById("op-result");
    if (result && op.result && Object.keys(op.result).length) {
      result.textContent = JSON.stringify(op.result, null, 2);
    }
    terminal = ["success", "failure", "cancelled"].indexOf(op.status) >= 0;
    if (terminal) {
      const cancel = document.getElementById("cancel-form");
      if (cancel) cancel.hidden = true;
      live.textContent = "finished";
      if (op.finished_at) endPhases(op.finished_at);
      // The outcome (downtime breakdown, debug bundle, what to do next) is rendered by the server.
      if (!was) ctweb.refresh(0);
    }
  }

  // --- phases: consecutive events of one phase make one span ------------------------------
  const spans = [];
  let finishedAt = null;
  function renderPhases() {
    if (!phaseList || !spans.length) return;
    const items = spans.map(function (s, i) {
      const li = document.createElement("li");
      li.dataset.phase = s.phase;
      const b = document.createElement("b");
      b.textContent = s.phase;
      li.appendChild(b);
      const end = i + 1 < spans.length ? spans[i + 1].start : finishedAt;
      if (["success", "failure", "cancelled"].indexOf(s.phase) >= 0) {
        return li; // where it ended, not a phase that took time
      }
      if (end !== null) {
        const d = document.createElement("span");
        d.className = "dur";
        d.textContent = Math.round((end - s.start) * 10) / 10 + " ms";
        li.appendChild(d);
      } else if (!terminal) {
        li.className = "current";
      }
      return li;
    });
    phaseList.replaceChildren.apply(phaseList, items);
  }
  function addPhase(e) {
    const t = new Date(e.at).getTime();
    if (isNaN(t)) return;
    const last = spans[spans.length - 1];
    if (last && last.phase === e.phase) return;
    spans.push({ phase: e.phase, start: t });
    spans.sort(function (a, b) { return a.start - b.start; });
  }
  function endPhases(iso) {
    const t = new Date(iso).getTime();
    if (!isNaN(t)) finishedAt = t;
    renderPhases();
  }

  // --- bytes moved over time, from the events that carry a byte count (migrations) ---------
  const chart = document.getElementById("op-chart");
  const points = [];
  function svgEl(name, attrs, text) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text !== undefined) el.textContent = text;
    return el;
  }
  function drawChart() {
    if (!chart || points.length < 2) return;
    const w = 640, h = 200, left = 56, right = 16, top = 28, bottom = 34;
    const t0 = points[0][0], t1 = Math.max(points[points.length - 1][0], t0 + 1);
    const maxB = Math.max.apply(null, points.map(function (p) { return p[1]; })) || 1;
    const mib = maxB / 1048576;
    const secs = (t1 - t0) / 1000;
    const x = function (t) { return left + (w - left - right) * (t - t0) / (t1 - t0); };
    const y = function (b) { return h - bottom - (h - top - bottom) * b / maxB; };
    const label = mib.toFixed(1) + " MiB moved in " + secs.toFixed(1) + " s";
    const svg = svgEl("svg", { viewBox: "0 0 " + w + " " + h, role: "img", "aria-label": "Bytes moved over time: " + label });
    svg.appendChild(svgEl("polyline", {
      fill: "none", stroke: "#5b6570",
      points: left + "," + top + " " + left + "," + (h - bottom) + " " + (w - right) + "," + (h - bottom),
    }));
    svg.appendChild(svgEl("text", { x: left - 6, y: top + 4, "font-size": "11", "text-anchor": "end" }, mib.toFixed(1)));
    svg.appendChild(svgEl("text", { x: left - 6, y: h - bottom, "font-size": "11", "text-anchor": "end" }, "0"));
    svg.appendChild(svgEl("text", { x: 4, y: top - 12, "font-size": "11" }, "MiB"));
    svg.appendChild(svgEl("text", { x: left, y: h - bottom + 16, "font-size": "11" }, "0 s"));
    svg.appendChild(svgEl("text", { x: w - right, y: h - bottom + 16, "font-size": "11", "text-anchor": "end" }, secs.toFixed(1) + " s"));
    svg.appendChild(svgEl("text", { x: left + 8, y: top - 12, "font-size": "12" }, label));
    svg.appendChild(svgEl("polyline", {
      fill: "none", stroke: "#1f5fbf", "stroke-width": "2",
      points: points.map(function (p) { return x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1); }).join(" "),
    }));
    chart.replaceChildren(svg);
  }

  const charted = new Set();
  function addEvent(e) {
    if (!e) return;
    if (typeof e.bytes === "number" && !charted.has(e.seq)) {
      charted.add(e.seq);
      points.push([new Date(e.at).getTime(), e.bytes]);
      points.sort(function (a, b) { return a[0] - b[0]; });
      drawChart();
    }
    if (seen.has(String(e.seq))) return;
    seen.add(String(e.seq));
    addPhase(e);
    renderPhases();
    const li = document.createElement("li");
    li.dataset.seq = e.seq;
    const b = document.createElement("b");
    b.textContent = e.phase;
    li.append(ctweb.timeElement(e.at, "time"), " ", b, " ", e.message || "");
    list.appendChild(li);
  }
  function addEvents(evts) {
    (evts || []).forEach(addEvent);
  }

  function poll() {
    fetch(apiUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (op) {
        if (!op) return;
        addEvents(op.events);
        setState(op);
        if (terminal) stopPolling();
      })
      .catch(function () {});
  }
  function startPolling() {
    if (!pollTimer && !terminal) pollTimer = setInterval(poll, 2000);
  }
  function stopPolling() {
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
  }

  let delay = 1000;
  function connect() {
    const ws = new WebSocket(ctweb.socketUrl("/ws/operations/" + id + "/"));
    ws.onopen = function () { delay = 1000; live.textContent = terminal ? "finished" : "live"; stopPolling(); };
    ws.onmessage = function (ev) {
      const msg = JSON.parse(ev.data);
      if (msg.type === "state") {
        addEvents(msg.events);
        setState(msg.operation);
      } else if (msg.type === "operation") {
        addEvent(msg.event);
        setState(msg.operation);
      }
    };
    ws.onclose = function () {
      if (terminal) return;
      live.textContent = "reconnecting (polling meanwhile)";
      startPolling();
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }

  // The phases and chart from what the server rendered, then live.
  list.querySelectorAll("li[data-seq] time[datetime]").forEach(function (t) {
    addPhase({ at: t.getAttribute("datetime"), phase: t.parentNode.querySelector("b").textContent });
  });
  const bar = document.getElementById("op-bar");
  bar.style.width = bar.dataset.progress + "%";
  if (chart) poll(); // the events with byte counts, for the chart
  if (!terminal) connect();
});
