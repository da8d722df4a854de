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

  function addEvent(e) {
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
  connect();
});
