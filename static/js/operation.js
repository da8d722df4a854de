// The operation page: live over /ws/operations/<id>/, polling the API while the socket is down.
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  const root = document.getElementById("operation");
  if (!root) return;
  const id = root.dataset.id;
  const apiUrl = root.dataset.api;
  const list = document.getElementById("op-events");
  const live = document.getElementById("op-live");
  const seen = new Set();
  list.querySelectorAll("li[data-seq]").forEach(function (li) { seen.add(li.dataset.seq); });
  let terminal = false;
  let pollTimer = null;

  function setState(op) {
    const status = document.getElementById("op-status");
    status.textContent = op.status;
    status.className = "status status-" + op.status;
    document.getElementById("op-phase").textContent = op.phase;
    document.getElementById("op-progress").textContent = op.progress + "%";
    document.getElementById("op-bar").style.width = op.progress + "%";
    document.getElementById("op-progressbar").setAttribute("aria-valuenow", op.progress);
    const err = document.getElementById("op-error");
    if (op.error) { err.textContent = op.error; err.hidden = false; }
    if (op.result && Object.keys(op.result).length) {
      document.getElementById("op-result").textContent = JSON.stringify(op.result, null, 2);
    }
    terminal = ["success", "failure", "cancelled"].indexOf(op.status) >= 0;
    if (terminal) {
      const cancel = document.getElementById("cancel-form");
      if (cancel) cancel.hidden = true;
      live.textContent = "finished";
    }
  }

  // Bytes moved over time, drawn from the events that carry a byte count (migrations).
  const chart = document.getElementById("op-chart");
  const points = [];
  function drawChart() {
    if (!chart || points.length < 2) return;
    const w = 600, h = 160, pad = 30;
    const t0 = points[0][0], t1 = points[points.length - 1][0] || t0 + 1;
    const maxB = Math.max.apply(null, points.map(function (p) { return p[1]; })) || 1;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("role", "img");
    const label = (maxB / 1048576).toFixed(1) + " MiB in " + ((t1 - t0) / 1000).toFixed(1) + " s";
    svg.setAttribute("aria-label", "bytes moved over time: " + label);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#1f5fbf");
    line.setAttribute("stroke-width", "2");
    line.setAttribute("points", points.map(function (p) {
      const x = pad + (w - 2 * pad) * (p[0] - t0) / Math.max(t1 - t0, 1);
      const y = h - pad - (h - 2 * pad) * p[1] / maxB;
      return x.toFixed(1) + "," + y.toFixed(1);
    }).join(" "));
    const axis = document.createElementNS(ns, "polyline");
    axis.setAttribute("fill", "none");
    axis.setAttribute("stroke", "#5b6570");
    axis.setAttribute("points", pad + "," + pad + " " + pad + "," + (h - pad) + " " + (w - pad) + "," + (h - pad));
    const text = document.createElementNS(ns, "text");
    text.setAttribute("x", pad + 6);
    text.setAttribute("y", pad - 8);
    text.setAttribute("font-size", "12");
    text.textContent = label;
    svg.append(axis, line, text);
    chart.replaceChildren(svg);
  }

  const charted = new Set();
  function addEvent(e) {
    if (e && typeof e.bytes === "number" && !charted.has(e.seq)) {
      charted.add(e.seq);
      points.push([new Date(e.at).getTime(), e.bytes]);
      points.sort(function (a, b) { return a[0] - b[0]; });
      drawChart();
    }
    if (!e || seen.has(String(e.seq))) return;
    seen.add(String(e.seq));
    const li = document.createElement("li");
    li.dataset.seq = e.seq;
    const t = document.createElement("time");
    t.textContent = new Date(e.at).toLocaleTimeString();
    const b = document.createElement("b");
    b.textContent = e.phase;
    li.append(t, " ", b, " ", e.message || "");
    list.appendChild(li);
  }

  function poll() {
    fetch(apiUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (op) {
        if (!op) return;
        setState(op);
        (op.events || []).forEach(addEvent);
        if (terminal && pollTimer) { clearInterval(pollTimer); pollTimer = null; }
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
    const ws = new WebSocket(ctwebSocketUrl("/ws/operations/" + id + "/"));
    ws.onopen = function () { delay = 1000; live.textContent = terminal ? "finished" : "live"; stopPolling(); };
    ws.onmessage = function (ev) {
      const msg = JSON.parse(ev.data);
      if (msg.type === "state") {
        setState(msg.operation);
        (msg.events || []).forEach(addEvent);
      } else if (msg.type === "operation") {
        setState(msg.operation);
        addEvent(msg.event);
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
  document.getElementById("op-bar").style.width = document.getElementById("op-bar").dataset.progress + "%";
  if (chart) poll();  // the events with byte counts, for the chart
  connect();
});
