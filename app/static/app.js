// The control page: results, the live settings and the pipeline state pushed over SSE; stats
// and IoT messages polled; controls via fetch. Plain JS, no build step. The token travels in an
// HttpOnly cookie set when the page was opened with ?token=, so nothing here ever sees it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  if (body.dataset.locked === "true") return;

  const POLL_MS = 2000;
  const STREAM_RETRY_MS = 2000;
  const RECONNECT_MS = [500, 1000, 2000, 4000];

  // -- connection and pipeline state -----------------------------------------------------------
  let online = true;
  let pipelineState = $("state").textContent.trim();
  let actions = null; // the actions the server offers in this state; null until it says
  let reconnects = 0;
  let events = null;
  let needHistory = false; // a new event stream: load the event history once it follows

  function applyButtons() {
    document.querySelectorAll("[data-action]").forEach((button) => {
      // Before the first state event the server-rendered page leaves the buttons as they are.
      if (actions) button.disabled = !online || !actions.includes(button.dataset.action);
    });
  }

  function setState(state, offered) {
    pipelineState = state;
    actions = offered;
    const el = $("state");
    el.textContent = state;
    el.className = "badge state-" + state;
    if (state !== "running") {
      // An fps measured before a pause or stop is not the rate now.
      $("fps").textContent = "–";
      $("infer-ms").textContent = "–";
    }
    applyButtons();
  }

  function setOffline() {
    if (!online) return;
    online = false;
    const el = $("state");
    el.textContent = "server unreachable — reconnecting";
    el.className = "badge state-unreachable";
    for (const id of ["fps", "infer-ms", "viewers", "encodes"]) $(id).textContent = "–";
    // The browser keeps showing the last frame of a cut stream: say it is old.
    $("stream").closest(".stream-wrap").dataset.stale = "true";
    applyButtons();
  }

  function setOnline() {
    if (online) return;
    online = true;
    delete $("stream").closest(".stream-wrap").dataset.stale;
    restartStream();
    pollStats();
    pollIot();
  }

  // -- results (SSE) ---------------------------------------------------------------------------
  const fmtPct = (p) => (p * 100).toFixed(p >= 0.995 ? 0 : 1) + "%";

  function resultKind(r) {
    if (r.model.type === "ssd") return "· detections";
    if (r.model.type !== "classification") return "· classes";
    // "top 10" over a 2-class model promises rows that cannot come; without label names the
    // number of classes is unknown, so no number at all.
    const classes = r.model.classes;
    return classes ? `· top ${Math.min(r.top_k, classes)}` : "· best first";
  }

  function renderResult(r) {
    $("seq").textContent = r.seq ?? "–";
    if (pipelineState === "running") {
      $("fps").textContent = r.fps != null ? Number(r.fps).toFixed(1) : "–";
      const ms = r.timings_ms && r.timings_ms.inference;
      $("infer-ms").textContent = ms != null ? Number(ms).toFixed(1) : "–";
    }
    if (r.model) {
      $("model-name").textContent = `${r.model.name} (${r.model.type})`;
      $("result-kind").textContent = resultKind(r);
    }
    // The file the frame came from (an image of a folder, a video file); none for a camera.
    const src = $("source-name");
    const origin = r.source;
    src.hidden = !origin;
    src.textContent = origin ? (origin.frame != null ? `${origin.name} #${origin.frame}` : origin.name) : "";
    src.title = origin ? origin.path : "";
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

  function handle(name, fn) {
    return (ev) => {
      try { fn(JSON.parse(ev.data)); } catch (e) { console.error(`bad ${name} event`, e); }
    };
  }

  function connectEvents() {
    const es = new EventSource("/results/events");
    events = es;
    needHistory = true;
    es.addEventListener("config", handle("config", (c) => { followConfig(c); }));
    es.addEventListener("state", handle("state", (s) => {
      reconnects = 0;
      setOnline();
      setState(s.state, s.actions);
      // The stream sends the notices from its first state event on: the history loaded now
      // misses none (notices that race the answer are merged), whatever happened while offline.
      if (needHistory) {
        needHistory = false;
        loadEvents();
      }
    }));
    es.addEventListener("result", handle("result", renderResult));
    es.addEventListener("event", handle("event", onNotice));
    // EventSource retries a dropped connection itself, but gives up for good on an answer that
    // is not a stream (a 503 while the server starts): reconnect here instead, in both cases.
    es.addEventListener("error", () => {
      if (events !== es) return;
      es.close();
      events = null;
      setOffline();
      const delay = RECONNECT_MS[Math.min(reconnects, RECONNECT_MS.length - 1)];
      reconnects += 1;
      setTimeout(connectEvents, delay);
    });
  }

  // -- stream image ----------------------------------------------------------------------------
  const img = $("stream");
  function restartStream() {
    img.src = "/stream.mjpg?r=" + Date.now();
  }
  img.addEventListener("error", () => {
    // Offline, the event stream's return restarts it; retrying here as well would only pile up.
    if (online) setTimeout(() => { if (online) restartStream(); }, STREAM_RETRY_MS);
  });

  // -- polling: stats and IoT messages ---------------------------------------------------------
  async function getJSON(url) {
    const res = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!res.ok) throw new Error(`${url}: ${res.status}`);
    return res.json();
  }

  async function pollStats() {
    if (!online) return;
    try {
      const s = await getJSON("/api/stats");
      $("viewers").textContent = s.viewers.length;
      const now = performance.now();
      const total = s.jpeg.encodes_total;
      if (pollStats.last && total >= pollStats.last.total) {
        const rate = (total - pollStats.last.total) / ((now - pollStats.last.t) / 1000);
        $("encodes").textContent = rate.toFixed(1);
      }
      pollStats.last = { total, t: now };
    } catch (e) { /* the event stream notices an unreachable server and says so */ }
  }

  // An IoT payload for people: probabilities in percent to 3 significant digits.
  const pct3 = (p) => `${Number((p * 100).toPrecision(3))}%`;
  const round3 = (_key, v) => (typeof v === "number" && !Number.isInteger(v) ? Number(v.toPrecision(3)) : v);

  function describePayload(text) {
    let data;
    try { data = JSON.parse(text); } catch (e) { return text; } // a status line: "... loaded"
    if (data === null || typeof data !== "object" || Array.isArray(data)) return JSON.stringify(data, round3);
    // The rich payload carries the seed's {label: prob} as "payload": that is the news.
    const labels = data.payload && typeof data.payload === "object" && Array.isArray(data.results) ? data.payload : data;
    const entries = Object.entries(labels);
    if (!entries.length) return "nothing above the threshold";
    if (!entries.every(([, v]) => typeof v === "number")) return JSON.stringify(data, round3);
    return entries.map(([k, v]) => `${k} ${v >= 0 && v <= 1 ? pct3(v) : round3("", v)}`).join(" · ");
  }

  const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString();

  // Consecutive messages that read the same once rounded are one row with a count; the row
  // keeps the newest one's raw text.
  function groupMessages(messages) {
    const groups = [];
    for (const m of messages) {
      const raw = typeof m.payload === "string" ? m.payload : JSON.stringify(m.payload ?? m);
      const text = describePayload(raw);
      const status = m.status && m.status !== "sent" ? m.status : "";
      const key = `${m.topic || ""}\n${status}\n${text}`;
      const last = groups[groups.length - 1];
      if (last && last.key === key) {
        last.count += 1;
        last.time = m.time ?? last.time;
        last.raw = raw;
      } else {
        const time = m.time ?? m.timestamp ?? null;
        groups.push({ key, text, status, raw, topic: m.topic || "", count: 1, first: time, time });
      }
    }
    return groups.reverse();
  }

  let iotSignature = "";
  async function pollIot() {
    if (!online) return;
    try {
      const messages = await getJSON("/api/iot/messages");
      const newest = messages[messages.length - 1];
      const signature = `${messages.length}:${newest ? newest.time : ""}`;
      if (signature === iotSignature) return;
      iotSignature = signature;
      const list = $("iot");
      const open = new Set([...list.querySelectorAll("details[open]")].map((d) => d.dataset.key));
      const rows = groupMessages(messages).map((g) => {
        const li = document.createElement("li");
        li.dataset.time = String(g.time ?? "");
        const details = document.createElement("details");
        // Keyed by the run's first message, so a row someone opened stays open as it grows.
        details.dataset.key = `${g.first}\n${g.key}`;
        details.open = open.has(details.dataset.key);
        const summary = document.createElement("summary");
        if (g.time != null) {
          const when = document.createElement("span");
          when.className = "when";
          when.textContent = fmtTime(g.time);
          if (g.count > 1 && g.first != null) when.title = `${g.count} messages, ${fmtTime(g.first)} – ${fmtTime(g.time)}`;
          summary.append(when);
        }
        const text = document.createElement("span");
        text.className = "text";
        text.textContent = g.text;
        summary.append(text);
        if (g.count > 1) {
          const count = document.createElement("span");
          count.className = "count";
          count.textContent = `×${g.count}`;
          summary.append(count);
        }
        if (g.status) {
          const status = document.createElement("span");
          status.className = "status";
          status.textContent = g.status;
          summary.append(status);
        }
        const raw = document.createElement("pre");
        raw.className = "raw";
        raw.textContent = (g.topic ? g.topic + "\n" : "") + g.raw;
        details.append(summary, raw);
        li.append(details);
        return li;
      });
      list.replaceChildren(...rows);
      $("no-iot").hidden = rows.length > 0;
    } catch (e) { /* as above */ }
  }

  // -- events: the history, live notices, the clip player --------------------------------------
  const canControl = body.dataset.canControl === "true";
  const EVENTS_SHOWN = 100;
  const DELETE_CONFIRM_MS = 4000;
  // id -> {ev, at}: the event as GET /api/events shows it, and when the page got it
  // (performance.now(): an event in progress counts its duration on from there, whatever the
  // device's clock says).
  const shownEvents = new Map();
  const knownLabels = new Set();
  let eventsFilter = "";
  let eventsLoads = 0; // an answer to an older load (another filter) is dropped
  let recording; // undefined until the history is loaded; null: recording is off
  let loadingEvents = false;
  let playingId = null;

  function fmtDuration(s) {
    if (!(s >= 0)) return "–";
    if (s < 60) return `${s.toFixed(1)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
    return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
  }

  function fmtWhen(t) {
    const d = new Date(t * 1000);
    return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  }

  // A notice and a history answer can cross: keep whichever says more (ended beats in progress,
  // then the longer one).
  function atLeastAsFresh(a, b) {
    if (a.in_progress !== b.in_progress) return !a.in_progress;
    return a.duration >= b.duration;
  }

  function liveDuration(entry) {
    const ev = entry.ev;
    return ev.in_progress ? ev.duration + (performance.now() - entry.at) / 1000 : ev.duration;
  }

  function durationText(entry) {
    return entry.ev.in_progress ? `in progress · ${fmtDuration(liveDuration(entry))}` : fmtDuration(entry.ev.duration);
  }

  function addLabel(label) {
    if (knownLabels.has(label)) return;
    knownLabels.add(label);
    const select = $("events-label");
    const option = new Option(label, label);
    const after = [...select.options].slice(1).find((o) => o.value.localeCompare(label) > 0);
    select.insertBefore(option, after || null);
  }

  function eventRow(entry) {
    const ev = entry.ev;
    const li = document.createElement("li");
    li.dataset.id = String(ev.id);
    li.dataset.label = ev.label;
    li.dataset.inProgress = String(!!ev.in_progress);
    if (ev.id === playingId) li.dataset.playing = "true";

    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.disabled = !ev.clip_url;
    const source = ev.source && ev.source.name ? ` · ${ev.source.name}` : "";
    open.title = ev.clip_url ? `Play the clip (${ev.model || "model"}${source})` : "No clip was recorded";
    let thumb;
    if (ev.snapshot_url) {
      thumb = document.createElement("img");
      // The snapshot is rewritten while a better frame comes and at the end.
      thumb.src = `${ev.snapshot_url}?v=${ev.best_time ?? ""}-${ev.end_time ?? ""}`;
      thumb.alt = `${ev.label} at its best frame`;
      thumb.loading = "lazy";
    } else {
      thumb = document.createElement("div");
      thumb.textContent = "no snapshot";
      thumb.classList.add("none");
    }
    thumb.classList.add("thumb");
    const info = document.createElement("span");
    info.className = "info";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = ev.label;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = fmtPct(ev.best_prob);
    label.append(prob);
    const when = document.createElement("span");
    when.className = "when";
    const time = document.createElement("time");
    time.dateTime = new Date(ev.start_time * 1000).toISOString();
    time.textContent = fmtWhen(ev.start_time);
    const dur = document.createElement("span");
    dur.className = ev.in_progress ? "dur live" : "dur";
    dur.textContent = durationText(entry);
    when.append(time, " · ", dur);
    info.append(label, when);
    open.append(thumb, info);
    open.addEventListener("click", () => play(ev.id));
    li.append(open);

    if (canControl) {
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete danger";
      del.textContent = "Delete";
      del.title = "Delete the event, its snapshots and its clip";
      del.addEventListener("click", () => deleteEvent(ev.id, del));
      li.append(del);
    }
    return li;
  }

  function showEvent(entry) {
    const list = $("events");
    const row = eventRow(entry);
    const old = list.querySelector(`li[data-id="${entry.ev.id}"]`);
    if (old) {
      old.replaceWith(row);
    } else {
      const before = [...list.children].find((li) => {
        const other = shownEvents.get(Number(li.dataset.id));
        return other && other.ev.start_time < entry.ev.start_time;
      });
      list.insertBefore(row, before || null);
    }
    while (list.children.length > EVENTS_SHOWN) {
      const last = list.lastElementChild;
      shownEvents.delete(Number(last.dataset.id));
      last.remove();
    }
  }

  function showEventsInfo() {
    const info = $("events-info");
    const card = document.querySelector(".events-card");
    card.dataset.recording = recording === undefined ? "" : recording ? "on" : "off";
    info.className = recording && recording.fault ? "events-info-fault" : "";
    if (recording === undefined) info.textContent = "";
    else if (!recording) info.textContent = "· recording off";
    else if (recording.fault) info.textContent = `· recording stopped: ${recording.fault}`;
    else info.textContent = `· newest first · recording ${(recording.rules || []).join(", ")}`;

    const empty = $("events-empty");
    empty.hidden = shownEvents.size > 0;
    if (!empty.hidden) {
      if (recording === undefined || loadingEvents) {
        empty.textContent = "Loading the event history…";
      } else if (eventsFilter) {
        empty.textContent = `No ${eventsFilter} events.`;
      } else if (recording) {
        empty.textContent = "No events yet: each one shows here as it starts.";
      } else {
        const flag = document.createElement("code");
        flag.textContent = "--record LABEL";
        const example = document.createElement("code");
        example.textContent = "--record person:0.6";
        empty.replaceChildren("Recording is off. Start the dashboard with ", flag, " (e.g. ", example,
          ", or any) to keep a snapshot and a clip of each detection, with what happened just before.");
      }
    }
  }

  function showEventsError(message) {
    const el = $("events-error");
    el.hidden = !message;
    el.textContent = message || "";
  }

  async function loadEvents() {
    const load = ++eventsLoads;
    const started = performance.now();
    const query = new URLSearchParams({ limit: String(EVENTS_SHOWN) });
    if (eventsFilter) query.set("label", eventsFilter);
    let data;
    loadingEvents = true;
    try {
      data = await getJSON("/api/events?" + query);
    } catch (e) {
      if (load === eventsLoads) {
        loadingEvents = false;
        showEventsError("The event history did not load: " + e.message);
        showEventsInfo();
      }
      return;
    }
    if (load !== eventsLoads) return;
    loadingEvents = false;
    showEventsError(null);
    recording = data.recording;
    (data.labels || []).forEach(addLabel);
    const merged = new Map();
    for (const ev of data.events || []) merged.set(ev.id, { ev, at: started });
    // Notices that came while the answer was on its way may be newer than it, or name an event
    // it does not have yet.
    for (const [id, entry] of shownEvents) {
      if (entry.at < started) continue;
      const fetched = merged.get(id);
      if (!fetched || atLeastAsFresh(entry.ev, fetched.ev)) merged.set(id, entry);
    }
    shownEvents.clear();
    $("events").replaceChildren();
    [...merged.values()].sort((a, b) => b.ev.start_time - a.ev.start_time)
      .forEach((entry) => { shownEvents.set(entry.ev.id, entry); showEvent(entry); });
    showEventsInfo();
  }

  function onNotice(notice) {
    if (notice.type === "gap") { // this page fell behind the notices: the history has it all
      loadEvents();
      return;
    }
    const ev = notice.after;
    if (!ev) return;
    addLabel(ev.label);
    if (recording === null) recording = { rules: [] }; // a notice means recording is on now
    if (eventsFilter && ev.label !== eventsFilter) return;
    const old = shownEvents.get(ev.id);
    if (old && !atLeastAsFresh(ev, old.ev)) return;
    const entry = { ev, at: performance.now() };
    shownEvents.set(ev.id, entry);
    showEvent(entry);
    if (ev.id === playingId) $("player-title").textContent = playerTitle(ev);
    showEventsInfo();
  }

  function tickLive() {
    document.querySelectorAll('#events li[data-in-progress="true"]').forEach((li) => {
      const entry = shownEvents.get(Number(li.dataset.id));
      const dur = li.querySelector(".dur");
      if (entry && dur) dur.textContent = durationText(entry);
    });
  }

  function playerTitle(ev) {
    const state = ev.in_progress ? " · in progress: the clip so far" : ` · ${fmtDuration(ev.duration)}`;
    return `${ev.label} ${fmtPct(ev.best_prob)} · ${fmtWhen(ev.start_time)}${state}`;
  }

  function markPlaying(id) {
    playingId = id;
    document.querySelectorAll("#events li[data-playing]").forEach((li) => { delete li.dataset.playing; });
    const row = id == null ? null : document.querySelector(`#events li[data-id="${id}"]`);
    if (row) row.dataset.playing = "true";
  }

  function play(id) {
    const entry = shownEvents.get(id);
    if (!entry || !entry.ev.clip_url) return;
    const ev = entry.ev;
    const video = $("event-video");
    showEventsError(null);
    $("player").hidden = false;
    $("player-title").textContent = playerTitle(ev);
    // A clip in progress grows: ask for it as it is now, not a copy of an earlier, shorter one.
    video.src = `${ev.clip_url}?v=${ev.in_progress ? Date.now() : ev.end_time}`;
    video.dataset.eventId = String(id);
    markPlaying(id);
    video.play().catch(() => { /* refused autoplay: the controls are there */ });
  }

  function closePlayer() {
    const video = $("event-video");
    video.pause();
    video.removeAttribute("src");
    delete video.dataset.eventId;
    video.load(); // drops the connection and the buffered clip
    $("player").hidden = true;
    markPlaying(null);
  }

  const MEDIA_ERRORS = { 1: "aborted", 2: "network error", 3: "cannot decode it", 4: "format not supported by this browser" };
  $("event-video").addEventListener("error", () => {
    const video = $("event-video");
    if (!video.getAttribute("src")) return;
    const code = video.error ? video.error.code : 0;
    showEventsError(`The clip does not play here: ${MEDIA_ERRORS[code] || "unknown error"}.`);
  });
  $("player-close").addEventListener("click", closePlayer);

  async function deleteEvent(id, button) {
    // Two clicks: a clip is gone for good, and the button sits where a thumbnail was tapped.
    if (!button.classList.contains("confirm")) {
      button.classList.add("confirm");
      button.textContent = "Confirm";
      setTimeout(() => {
        button.classList.remove("confirm");
        button.textContent = "Delete";
      }, DELETE_CONFIRM_MS);
      return;
    }
    button.setAttribute("aria-busy", "true");
    try {
      const res = await fetch(`/api/events/${id}`, { method: "DELETE", credentials: "same-origin" });
      if (res.ok || res.status === 404) { // 404: someone else deleted it already
        if (playingId === id) closePlayer();
        shownEvents.delete(id);
        const row = document.querySelector(`#events li[data-id="${id}"]`);
        if (row) row.remove();
        showEventsError(null);
        showEventsInfo();
        return;
      }
      let data = null;
      try { data = await res.json(); } catch (e) { /* no JSON body */ }
      showEventsError("Not deleted: " + describeError(data, res.status));
    } catch (e) {
      showEventsError("The dashboard did not answer: " + e.message);
    } finally {
      button.removeAttribute("aria-busy");
      button.classList.remove("confirm");
      button.textContent = "Delete";
    }
  }

  $("events-label").addEventListener("change", (e) => {
    eventsFilter = e.target.value;
    shownEvents.clear();
    $("events").replaceChildren();
    const loaded = loadEvents();
    showEventsInfo(); // "Loading": the load has begun
    return loaded;
  });

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

  function invalidFields(data) {
    return data && Array.isArray(data.detail)
      ? data.detail.map((d) => (Array.isArray(d.loc) ? d.loc[d.loc.length - 1] : "")) : [];
  }

  // Outline the field a 422 names; the next successful change clears it.
  function markInvalid(fields) {
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

  // Resolves to [ok, data]: data is the JSON body (or null), shown as an error when not ok.
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
      if (!res.ok) showResult(describeError(data, res.status), null);
      return [res.ok, data];
    } catch (e) {
      showResult("The dashboard did not answer: " + e.message, null);
      return [false, null];
    } finally {
      if (busyEl) busyEl.removeAttribute("aria-busy");
    }
  }

  // The live settings, as the server last pushed or answered them; each control shows its value
  // except while someone is typing into it (focused and changed) or its change is on the way.
  let live = null;
  const pending = new Set();
  const CONTROLS = {
    threshold: ["threshold", "threshold-range"],
    top_k: ["top_k"],
    display_res: ["display_res"],
    overlay: ["overlay"],
    model: ["model"],
    source: ["source"],
  };
  const shown = {};

  function readControl(el) {
    return el.type === "checkbox" ? el.checked : el.value;
  }

  function typing(field) {
    return CONTROLS[field].some((id) => {
      const el = $(id);
      // A select or a checkbox applies at once: focused after a click is not "being edited".
      if (el.tagName === "SELECT" || el.type === "checkbox") return false;
      return el === document.activeElement && String(readControl(el)) !== String(shown[id]);
    });
  }

  function fillField(field, force) {
    if (!live || !(field in live)) return;
    if (!force && (pending.has(field) || typing(field))) return;
    for (const id of CONTROLS[field]) {
      const el = $(id);
      const value = field === "overlay" ? !!live[field] : String(live[field] ?? "");
      if (el.type === "checkbox") el.checked = value; else el.value = value;
      shown[id] = readControl(el);
    }
  }

  function followConfig(settings) {
    live = settings;
    Object.keys(CONTROLS).forEach((field) => fillField(field, false));
  }

  async function patch(changes, busyEl) {
    const fields = Object.keys(changes);
    fields.forEach((f) => pending.add(f));
    let ok, data;
    try {
      [ok, data] = await send("PATCH", "/api/config", changes, busyEl);
    } finally {
      fields.forEach((f) => pending.delete(f));
    }
    if (ok && data) {
      clearInvalid();
      followConfig(data);
      // What was just applied is no longer a draft, though the box may keep the focus.
      fields.forEach((f) => fillField(f, true));
      showResult(null, "Applied: " + fields.join(", "));
    } else {
      const refused = invalidFields(data);
      markInvalid(refused);
      // The box must not keep a value the server refused: back to the one in use.
      fields.forEach((f) => fillField(f, true));
    }
  }

  function wireControls() {
    document.querySelectorAll("[data-action]").forEach((button) => {
      button.addEventListener("click", async () => {
        const [ok, data] = await send("POST", "/api/pipeline/" + button.dataset.action, null, button);
        if (ok && data) {
          showResult(null, data.changed === false ? `Already ${data.state}` : `Pipeline ${data.state}`);
        }
        applyButtons(); // the state event brings the new ones; a refused click leaves the old
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
    // Leaving a field without applying it: it shows the live value again, not a stale draft.
    // Its Load/Open button belongs to it (a click there is how the draft is applied).
    Object.keys(CONTROLS).forEach((field) => {
      const group = $(CONTROLS[field][0]).closest(".pair") || $(CONTROLS[field][0]);
      group.addEventListener("focusout", (e) => {
        if (!group.contains(e.relatedTarget)) setTimeout(() => fillField(field, false), 0);
      });
    });
  }

  connectEvents();
  wireControls();
  pollStats();
  pollIot();
  setInterval(pollStats, POLL_MS);
  setInterval(pollIot, POLL_MS);
  setInterval(tickLive, 1000);
})();
