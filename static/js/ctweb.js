// Shared page behaviour: confirmations, local times, the live count of running operations,
// and live regions that follow the fleet over /ws/events/ (polling the server while it is down).
"use strict";

const ctweb = (function () {
  function socketUrl(path) {
    const proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    return proto + "//" + window.location.host + path;
  }

  // --- times: stored and sent in UTC, shown in the browser's time zone ---------------------
  const pad = function (n, w) { return String(n).padStart(w || 2, "0"); };
  let zoneFormat = null;
  function zoneName(d) {
    try {
      if (!zoneFormat) zoneFormat = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" });
      const part = zoneFormat.formatToParts(d).find(function (p) { return p.type === "timeZoneName"; });
      return part ? part.value : "";
    } catch (e) {
      return "";
    }
  }
  function formatTime(d, mode) {
    const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    if (mode === "time") return time + "." + pad(d.getMilliseconds(), 3);
    const date = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate());
    return date + " " + time + " " + zoneName(d);
  }
  function showTime(el) {
    // Without JavaScript the server's text stays: the same instant in UTC, marked as such.
    const d = new Date(el.getAttribute("datetime"));
    if (isNaN(d)) return;
    el.textContent = formatTime(d, el.dataset.format);
    el.title = d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
  function localTimes(root) {
    (root || document).querySelectorAll("time[datetime]").forEach(showTime);
  }
  function timeElement(iso, mode) {
    const t = document.createElement("time");
    t.setAttribute("datetime", iso);
    if (mode) t.dataset.format = mode;
    t.textContent = iso;
    showTime(t);
    return t;
  }

  // --- live regions: [data-live] elements are re-read from the server when the fleet changes ---
  let refreshTimer = null;
  let refreshing = false;
  let again = false;
  const served = new Map(); // region id -> the server's HTML it shows (before times were localised)
  function regions() { return document.querySelectorAll("[data-live][id]"); }
  function comparable(html) {
    // Each response masks the CSRF token differently; that alone is no change.
    return html.replace(/name="csrfmiddlewaretoken" value="[^"]*"/g, "");
  }
  function busy(region) {
    // Never pull a control away from someone using it (typing, or focused from the keyboard).
    const a = document.activeElement;
    return a && a !== document.body && region.contains(a);
  }
  function refreshNow() {
    if (!regions().length) return;
    if (refreshing) { again = true; return; }
    refreshing = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.status === 404) { gone(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (!html) return;
        const doc = new DOMParser().parseFromString(html, "text/html");
        let deferred = false;
        regions().forEach(function (region) {
          const fresh = doc.getElementById(region.id);
          if (!fresh) return;
          const html = comparable(fresh.innerHTML);
          if (served.get(region.id) === html) return;
          if (busy(region)) { deferred = true; return; }
          served.set(region.id, html);
          region.replaceWith(fresh);
          localTimes(fresh);
          document.dispatchEvent(new CustomEvent("ctweb:region", { detail: fresh }));
        });
        if (deferred) refresh(3000);
      })
      .catch(function () {})
      .finally(function () {
        refreshing = false;
        if (again) { again = false; refresh(); }
      });
  }
  function refresh(delay) {
    if (refreshTimer) clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () { refreshTimer = null; refreshNow(); }, delay || 250);
  }
  function gone() {
    if (document.getElementById("gone")) return;
    const p = document.createElement("p");
    p.id = "gone";
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = "This no longer exists: it was deleted meanwhile. ";
    const a = document.createElement("a");
    a.href = "/";
    a.textContent = "Back to the overview";
    p.appendChild(a);
    document.getElementById("main").prepend(p);
  }

  // --- confirmations before destructive actions (delegated: regions are replaced) -------------
  document.addEventListener("submit", function (ev) {
    const form = ev.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      ev.preventDefault();
    }
  });

  // --- the migration picker: a target's strategies, and why some are not possible ------------
  function updatePicker() {
    const target = document.getElementById("mig-target");
    const strategy = document.getElementById("mig-strategy");
    const why = document.getElementById("mig-why");
    if (!target || !strategy) return;
    const opt = target.options[target.selectedIndex];
    let refused = {};
    try { refused = JSON.parse((opt && opt.dataset.refused) || "{}"); } catch (e) { refused = {}; }
    const reasons = [];
    Array.prototype.forEach.call(strategy.options, function (o) {
      const reason = refused[o.value];
      o.disabled = Boolean(reason);
      o.textContent = o.value + (reason ? " (not possible)" : "");
      if (reason) reasons.push(o.value + ": " + reason);
    });
    if (strategy.options[strategy.selectedIndex].disabled) strategy.value = "auto";
    if (why) why.textContent = reasons.length ? "To " + opt.value + ", not possible: " + reasons.join(" ") : "";
  }
  // Predictions come from the API's dry run (it asks the source for the container's memory:
  // about a second), on request and again when the target changes after a first one.
  let predicted = false;
  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }
  function ms(v) { return v === null || v === undefined ? "—" : (v >= 10000 ? (v / 1000).toFixed(1) + " s" : Math.round(v) + " ms"); }
  function predict() {
    const button = document.getElementById("predict-button");
    const target = document.getElementById("mig-target");
    const form = document.getElementById("migrate-form");
    const status = document.getElementById("mig-predict-status");
    const table = document.getElementById("mig-predictions");
    if (!button || !target || !form || !table) return;
    const token = form.querySelector("input[name=csrfmiddlewaretoken]");
    status.textContent = "Predicting…";
    predicted = true;
    fetch("/api/v1/containers/" + encodeURIComponent(button.dataset.container) + "/migrate", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": token ? token.value : "" },
      body: JSON.stringify({ target_host: target.value, dry_run: true }),
    }).then(function (r) {
      return r.json().then(function (body) { return { ok: r.ok, body: body }; });
    }).then(function (res) {
      if (!res.ok) { status.textContent = "No prediction: " + (res.body.error || "refused"); return; }
      const body = res.body;
      const tbody = table.querySelector("tbody");
      tbody.textContent = "";
      Object.keys(body.strategies).forEach(function (name) {
        const s = body.strategies[name];
        const row = document.createElement("tr");
        row.dataset.strategy = name;
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = name;
        row.appendChild(th);
        cell(row, s.possible ? "yes" : "no: " + s.why_not);
        cell(row, ms(s.predicted_downtime_ms));
        cell(row, ms(s.predicted_total_ms));
        cell(row, s.calibration ? s.calibration.source : (s.why_no_prediction || ""));
        tbody.appendChild(row);
      });
      const i = body.inputs;
      document.getElementById("mig-predicted-target").textContent = body.target;
      document.getElementById("mig-predicted-inputs").textContent =
        (i.memory_bytes === null ? "memory unknown" : (i.memory_bytes / 1048576).toFixed(0) + " MiB of memory") +
        ", images at " + i.path_mib_s + " MiB/s (" + i.path_rate_from + ")" +
        ", rootfs at " + i.tree_mib_s + " MiB/s (" + i.tree_rate_from + ")";
      table.hidden = false;
      status.textContent = body.chosen ? "auto would choose " + body.chosen + "." : "";
    }).catch(function () { status.textContent = "No prediction: the request failed."; });
  }
  document.addEventListener("click", function (ev) {
    if (ev.target && ev.target.id === "predict-button") predict();
  });
  document.addEventListener("change", function (ev) {
    if (ev.target && ev.target.id === "mig-target") {
      updatePicker();
      if (predicted) predict();
    }
  });

  // --- the fleet stream ------------------------------------------------------------------
  const active = new Map();
  const known = new Map(); // operation id -> last status seen, to refresh regions on changes only
  function renderCount() {
    const counter = document.getElementById("active-ops");
    if (counter) counter.textContent = active.size ? active.size + " running" : "";
  }
  function updateOperation(op) {
    if (op.status === "pending" || op.status === "running") active.set(op.id, op);
    else active.delete(op.id);
    renderCount();
    document.querySelectorAll('tr[data-op="' + op.id + '"]').forEach(function (row) {
      const s = row.querySelector('[data-field="status"]');
      if (s) { s.textContent = op.status; s.className = "status status-" + op.status; }
      const p = row.querySelector('[data-field="phase"]');
      if (p) p.textContent = op.phase;
      const g = row.querySelector('[data-field="progress"]');
      if (g) g.textContent = op.progress + "%";
    });
    if (known.get(op.id) !== op.status) {
      known.set(op.id, op.status);
      refresh();
    }
  }
  function updateHost(h) {
    document.querySelectorAll('[data-host="' + h.name + '"] [data-field="status"]').forEach(function (s) {
      s.textContent = h.status; s.className = "status status-" + h.status;
    });
    refresh();
  }
  function updateContainer(c) {
    document.querySelectorAll('[data-container="' + c.name + '"]').forEach(function (el) {
      const s = el.matches(".status") ? el : el.querySelector('[data-field="state"]');
      if (s && c.state !== "DELETED") { s.textContent = c.state; s.className = "status status-" + c.state; }
    });
    refresh();
  }

  let pollTimer = null;
  function poll() {
    refreshNow();
    Promise.all(["running", "pending"].map(function (status) {
      return fetch("/api/v1/operations/?limit=100&status=" + status, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : []; });
    })).then(function (lists) {
      active.clear();
      lists.forEach(function (ops) { ops.forEach(function (op) { active.set(op.id, op); }); });
      renderCount();
    }).catch(function () {});
  }
  function startPolling() {
    if (pollTimer) return;
    pollTimer = setInterval(poll, 4000);
    poll();
  }
  function stopPolling() {
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
  }
  function setLive(mode) {
    document.documentElement.dataset.live = mode;
  }

  let delay = 1000;
  let opened = false;
  function connect() {
    let ws;
    try {
      ws = new WebSocket(socketUrl("/ws/events/"));
    } catch (e) {
      setLive("polling");
      startPolling();
      return;
    }
    ws.onopen = function () {
      delay = 1000;
      setLive("live");
      stopPolling();
      if (opened) refresh(); // what changed while the socket was down
      opened = true;
    };
    ws.onmessage = function (ev) {
      const msg = JSON.parse(ev.data);
      if (msg.type === "state") {
        active.clear();
        (msg.active_operations || []).forEach(function (op) {
          active.set(op.id, op);
          known.set(op.id, op.status);
        });
        renderCount();
      } else if (msg.type === "operation") {
        updateOperation(msg.operation);
      } else if (msg.type === "host") {
        updateHost(msg.data);
      } else if (msg.type === "container") {
        updateContainer(msg.data);
      }
      document.dispatchEvent(new CustomEvent("ctweb:event", { detail: msg }));
    };
    ws.onclose = function () {
      setLive("polling");
      startPolling();
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    regions().forEach(function (r) { served.set(r.id, comparable(r.innerHTML)); });
    localTimes();
    updatePicker();
    if (document.getElementById("active-ops")) connect();
  });

  return { socketUrl: socketUrl, localTimes: localTimes, formatTime: formatTime, timeElement: timeElement, refresh: refresh };
})();

// Kept for older page scripts.
function ctwebSocketUrl(path) { return ctweb.socketUrl(path); }
function ctwebLocalTimes(root) { ctweb.localTimes(root); }
