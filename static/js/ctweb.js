// Shared page behaviour: confirmations, local times, and the live count of running operations.
"use strict";

function ctwebSocketUrl(path) {
  const proto = window.location.protocol === "https:" ? "wss:" : "ws:";
  return proto + "//" + window.location.host + path;
}

function ctwebLocalTimes(root) {
  (root || document).querySelectorAll("time[datetime]").forEach(function (el) {
    const d = new Date(el.getAttribute("datetime"));
    if (!isNaN(d)) el.textContent = d.toLocaleString();
  });
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  });
  ctwebLocalTimes();

  const counter = document.getElementById("active-ops");
  if (!counter) return;
  const active = new Map();
  function render() {
    counter.textContent = active.size ? active.size + " running" : "";
  }
  function update(op) {
    if (op.status === "pending" || op.status === "running") active.set(op.id, op);
    else active.delete(op.id);
    render();
    // Rows of operation tables on the page follow along.
    document.querySelectorAll('tr[data-op="' + op.id + '"]').forEach(function (row) {
      const s = row.querySelector('[data-field="status"]');
      if (s) { s.textContent = op.status; s.className = "status status-" + op.status; }
      const p = row.querySelector('[data-field="phase"]');
      if (p) p.textContent = op.phase;
      const g = row.querySelector('[data-field="progress"]');
      if (g) g.textContent = op.progress + "%";
    });
  }
  function updateHost(h) {
    document.querySelectorAll('tr[data-host="' + h.name + '"]').forEach(function (row) {
      const s = row.querySelector('[data-field="status"]');
      if (s) { s.textContent = h.status; s.className = "status status-" + h.status; }
      const c = row.querySelector('[data-field="criu_version"]');
      if (c) c.textContent = h.criu_version || "—";
    });
  }
  function updateContainer(c) {
    document.querySelectorAll('[data-container="' + c.name + '"]').forEach(function (el) {
      const s = el.matches(".status") ? el : el.querySelector('[data-field="state"]');
      if (s) { s.textContent = c.state; s.className = "status status-" + c.state; }
      if (c.state === "DELETED" && el.tagName === "TR") el.remove();
      const ip = el.querySelector('[data-field="ipv4"]');
      if (ip && c.ipv4) ip.textContent = c.ipv4 + " (eth0)";
    });
  }
  let delay = 1000;
  function connect() {
    const ws = new WebSocket(ctwebSocketUrl("/ws/events/"));
    ws.onopen = function () { delay = 1000; };
    ws.onmessage = function (ev) {
      const msg = JSON.parse(ev.data);
      if (msg.type === "state") {
        active.clear();
        (msg.active_operations || []).forEach(update);
        render();
      } else if (msg.type === "operation") {
        update(msg.operation);
      } else if (msg.type === "host") {
        updateHost(msg.data);
      } else if (msg.type === "container") {
        updateContainer(msg.data);
      }
      document.dispatchEvent(new CustomEvent("ctweb:event", { detail: msg }));
    };
    ws.onclose = function () {
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }
  connect();
});
