// The control page: results pushed over SSE, stats and IoT messages polled, controls via fetch.
// Plain JS, no build step. The token travels in an HttpOnly cookie set when the page was opened
// with ?token=, so nothing here ever sees it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  if (body.dataset.locked === "true") return;

  const POLL_MS = 2000;
  const STREAM_RETRY_MS = 2000;

  // -- results (SSE) ---------------------------------------------------------------------------
  const fmtPct = (p) => (p * 100).toFixed(p >= 0.995 ? 0 : 1) + "%";

  function renderResult(r) {
    $("seq").textContent = r.seq ?? "–";
    $("fps").textContent = r.fps != null ? Number(r.fps).toFixed(1) : "–";
    const ms = r.timings_ms && r.timings_ms.inference;
    $("infer-ms").textContent = ms != null ? Number(ms).toFixed(1) : "–";
    if (r.state) setState(r.state);
    if (r.model) {
      $("model-name").textContent = `${r.model.name} (${r.model.type})`;
      $("result-kind").textContent = r.model.type === "ssd" ? "· detections" : `· top ${r.top_k}`;
    }
    const err = $("result-error");
    err.hidden = !r.error;
    err.textContent = r.error || "";

    const list = $("results");
    const items = r.results || [];
    const rows = items.map((item) => {
      const li = document.createElement("li");
      const row = document.createElement("div");
      row.className = "row";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = item.name;
      name.title = `${item.name} (id ${item.label})`;
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = fmtPct(item.prob);
      row.append(name, prob);
      li.append(row);
      if (item.box) {
        const b = item.box;
        const box = document.createElement("div");
        box.className = "box";
        box.textContent = `(${b.xmin.toFixed(0)}, ${b.ymin.toFixed(0)}) – (${b.xmax.toFixed(0)}, ${b.ymax.toFixed(0)})`;
        li.append(box);
      } else {
        const bar = document.createElement("div");
        bar.className = "bar";
        const fill = document.createElement("span");
        fill.style.width = Math.max(0, Math.min(100, item.prob * 100)).toFixed(1) + "%";
        bar.append(fill);
        li.append(bar);
      }
      return li;
    });
    list.replaceChildren(...rows);
    list.dataset.seq = String(r.seq);
    $("no-results").hidden = rows.length > 0;
    $("no-results").textContent = r.seq ? `Nothing above the threshold (${r.threshold}).` : "Waiting for results…";
  }

  function connectEvents() {
    const es = new EventSource("/results/events");
    es.addEventListener("result", (ev) => {
      try { renderResult(JSON.parse(ev.data)); } catch (e) { console.error("bad result event", e); }
    });
    // EventSource reconnects by itself (the server sends retry:); nothing else to do on error.
  }

  // -- stream image: reconnect after a server restart ------------------------------------------
  const img = $("stream");
  img.addEventListener("error", () => {
    setTimeout(() => { img.src = "/stream.mjpg?r=" + Date.now(); }, STREAM_RETRY_MS);
  });

  // -- polling: stats and IoT messages ---------------------------------------------------------
  function setState(state) {
    const el = $("state");
    el.textContent = state;
    el.className = "badge state-" + state;
  }

  async function getJSON(url) {
    const res = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!res.ok) throw new Error(`${url}: ${res.status}`);
    return res.json();
  }

  async function pollStats() {
    try {
      const s = await getJSON("/api/stats");
      setState(s.state);
      $("viewers").textContent = s.viewers.length;
      if (s.state !== "running") $("fps").textContent = "0.0";
      const now = performance.now();
      const total = s.jpeg.encodes_total;
      if (pollStats.last) {
        const rate = (total - pollStats.last.total) / ((now - pollStats.last.t) / 1000);
        $("encodes").textContent = rate.toFixed(1);
      }
      pollStats.last = { total, t: now };
    } catch (e) { /* the server may be restarting: try again next tick */ }
  }

  async function pollIot() {
    try {
      const messages = await getJSON("/api/iot/messages");
      const list = $("iot");
      const rows = messages.slice(-20).reverse().map((m) => {
        const li = document.createElement("li");
        const when = m.time ?? m.timestamp;
        if (when) {
          const t = document.createElement("span");
          t.className = "when";
          t.textContent = new Date(when * 1000).toLocaleTimeString();
          li.append(t);
        }
        const text = document.createElement("span");
        const payload = m.payload !== undefined ? m.payload : m;
        text.textContent = (m.topic ? m.topic + " " : "") + (typeof payload === "string" ? payload : JSON.stringify(payload));
        li.append(text);
        return li;
      });
      list.replaceChildren(...rows);
      $("no-iot").hidden = rows.length > 0;
    } catch (e) { /* as above */ }
  }

  // -- controls --------------------------------------------------------------------------------
  function describeError(data, status) {
    if (data && Array.isArray(data.detail)) {
      return data.detail.map((d) => {
        const field = Array.isArray(d.loc) ? d.loc.filter((x) => x !== "body").join(".") : "";
        return field ? `${field}: ${d.msg}` : d.msg;
      }).join("; ");
    }
    if (data && typeof data.detail === "string") return data.detail;
    return `request failed (HTTP ${status})`;
  }

  // Outline the field a 422 names; the next successful change clears it.
  function markInvalid(data) {
    const fields = data && Array.isArray(data.detail)
      ? data.detail.map((d) => (Array.isArray(d.loc) ? d.loc[d.loc.length - 1] : "")) : [];
    fields.forEach((f) => { const el = document.getElementById(f); if (el) el.setAttribute("aria-invalid", "true"); });
  }

  function clearInvalid() {
    document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  }

  let okTimer = null;
  function showResult(error, ok) {
    const errEl = $("control-error");
    const okEl = $("control-ok");
    errEl.hidden = !error;
    errEl.textContent = error || "";
    okEl.hidden = !ok;
    okEl.textContent = ok || "";
    clearTimeout(okTimer);
    if (ok) okTimer = setTimeout(() => { okEl.hidden = true; }, 2500);
  }

  async function send(method, url, payload, busyEl) {
    if (busyEl) busyEl.setAttribute("aria-busy", "true");
    try {
      const res = await fetch(url, {
        method,
        credentials: "same-origin",
        headers: payload ? { "Content-Type": "application/json" } : {},
        body: payload ? JSON.stringify(payload) : undefined,
      });
      let data = null;
      try { data = await res.json(); } catch (e) { /* an empty or non-JSON body */ }
      if (!res.ok) {
        showResult(describeError(data, res.status), null);
        markInvalid(data);
        return null;
      }
      return data;
    } catch (e) {
      showResult("The dashboard did not answer: " + e.message, null);
      return null;
    } finally {
      if (busyEl) busyEl.removeAttribute("aria-busy");
    }
  }

  function fillSettings(s) {
    $("threshold").value = s.threshold;
    $("threshold-range").value = s.threshold;
    $("top_k").value = s.top_k;
    $("display_res").value = s.display_res;
    $("overlay").checked = !!s.overlay;
    $("model").value = s.model;
    $("source").value = s.source;
  }

  async function patch(changes, busyEl) {
    const settings = await send("PATCH", "/api/config", changes, busyEl);
    if (settings) {
      clearInvalid();
      fillSettings(settings);
      showResult(null, "Applied: " + Object.keys(changes).join(", "));
    }
  }

  function wireControls() {
    document.querySelectorAll("[data-action]").forEach((button) => {
      button.addEventListener("click", async () => {
        const data = await send("POST", "/api/pipeline/" + button.dataset.action, null, button);
        if (data) {
          setState(data.state);
          showResult(null, `Pipeline ${data.state}`);
        }
      });
    });
    const threshold = $("threshold");
    const range = $("threshold-range");
    range.addEventListener("input", () => { threshold.value = range.value; });
    range.addEventListener("change", () => patch({ threshold: range.value }));
    threshold.addEventListener("change", () => {
      range.value = threshold.value;
      patch({ threshold: threshold.value });
    });
    $("top_k").addEventListener("change", (e) => patch({ top_k: e.target.value }));
    $("display_res").addEventListener("change", (e) => patch({ display_res: e.target.value }));
    $("overlay").addEventListener("change", (e) => patch({ overlay: e.target.checked }));
    document.querySelectorAll("[data-apply]").forEach((button) => {
      const field = button.dataset.apply;
      const input = $(field);
      const apply = () => patch({ [field]: input.value.trim() }, button);
      button.addEventListener("click", apply);
      input.addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
    });
  }

  connectEvents();
  wireControls();
  pollStats();
  pollIot();
  setInterval(pollStats, POLL_MS);
  setInterval(pollIot, POLL_MS);
})();
