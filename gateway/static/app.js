// The operator's console: sign-in, overview, sensors (search, sort, pages) and one
// sensor's chart. Everything shown from the server or from a sensor id goes in as text
// (textContent, attributes), never as HTML.
"use strict";
(() => {
  const $ = (selector) => document.querySelector(selector);
  const PAGE = 50;
  const SUBSCRIBE_CHUNK = 100; // patterns per websocket message (the server's limit)
  const EVERY = { overview: 15000, sensors: 10000, sensor: 10000 };
  const DETAIL_AFTER_PREDICTION = 5000; // ms: a live sensor's actuals refresh at most this often

  const state = {
    token: sessionStorage.getItem("forecast.token") || "",
    wsPort: sessionStorage.getItem("forecast.ws") || "",
    me: null,
    view: null,
    sensor: null,
    detail: null,
    chart: null,
    driftChart: null,
    page: { offset: 0, total: 0, rows: [] },
    latest: new Map(), // sensor -> latest prediction seen on the websocket
    socket: null,
    subscribed: new Set(),
    received: 0,
    due: {},
    detailAt: 0,
  };

  // -- small helpers ----------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // Rows into a table body (or items into a list), or one line saying there are none.
  function fill(target, rows, columns, empty) {
    const none = target.tagName === "TBODY"
      ? el("tr", { class: "empty" }, el("td", { colspan: columns }, empty))
      : el("li", { class: "muted" }, empty);
    target.replaceChildren(...(rows.length ? rows : [none]));
  }

  const num = (v, digits = 3) => (v === null || v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits));
  const pct = (v) => (v === null || v === undefined || !Number.isFinite(v) ? "–" : `${(100 * v).toFixed(1)}%`);
  const when = (text) => (text ? String(text).replace("T", " ").replace(/\.\d+Z$|Z$/, "") : "–");
  const sensorLink = (id) => el("a", { href: `#sensor=${encodeURIComponent(id)}` }, id);
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  function toast(text) {
    const box = $("#toast");
    box.textContent = text;
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  function setStatus(text, cls) {
    const pill = $("#status");
    pill.textContent = text;
    pill.className = `pill ${cls || ""}`;
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(`${code}: ${message}`);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options = {}) {
    const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
    const response = await fetch(path, { ...options, headers });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const err = (body && body.error) || { code: "http_error", message: String(response.status) };
      if (response.status === 401 && state.me) signOut(`signed out: ${err.message}`);
      if (response.status === 429) toast(`rate limited: retrying (${err.message})`);
      throw new ApiError(response.status, err.code, err.message);
    }
    return body;
  }

  // -- sign-in ----------------------------------------------------------------------

  async function signIn(token, wsPort) {
    state.token = token;
    const me = await api("/v1/me");
    state.me = me;
    state.wsPort = wsPort || state.wsPort || "8765";
    sessionStorage.setItem("forecast.token", token);
    sessionStorage.setItem("forecast.ws", state.wsPort);
    document.body.classList.toggle("can-models", !!me.can.models);
    document.body.classList.toggle("can-sql", !!me.can.sql);
    document.body.dataset.role = me.role;
    const who = $("#who");
    who.textContent = `${me.role} · ${me.key_id}`;
    who.hidden = false;
    $("#signout").hidden = false;
    connect();
  }

  function signOut(message) {
    state.me = null;
    state.token = "";
    sessionStorage.removeItem("forecast.token");
    document.body.classList.remove("can-models", "can-sql");
    delete document.body.dataset.role;
    $("#who").hidden = true;
    $("#signout").hidden = true;
    if (state.socket) {
      state.socket.onclose = null;
      state.socket.close();
      state.socket = null;
    }
    state.subscribed.clear();
    setStatus("offline");
    showView("signin");
    $("#signin-error").textContent = message || "";
  }

  $("#signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#signin-error").textContent = "";
    try {
      await signIn($("#token-input").value.trim(), $("#ws-input").value.trim());
      $("#token-input").value = "";
      if (!location.hash || location.hash === "#signin") location.hash = "overview";
      else route();
    } catch (err) {
      state.me = null;
      $("#signin-error").textContent = err instanceof ApiError ? `refused: ${err.message}` : String(err);
    }
  });
  $("#signout").addEventListener("click", () => signOut("signed out"));
  $("#token-input").addEventListener("input", () => { $("#signin-error").textContent = ""; });

  // -- the websocket ----------------------------------------------------------------

  function connect() {
    if (state.socket) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.hostname}:${state.wsPort}/v1/stream?token=${encodeURIComponent(state.token)}`;
    setStatus("connecting");
    const socket = new WebSocket(url);
    state.socket = socket;
    socket.onopen = () => {
      setStatus("live", "live");
      state.subscribed.clear();
      syncSubscriptions();
    };
    socket.onmessage = (event) => onMessage(JSON.parse(event.data));
    socket.onclose = () => {
      state.socket = null;
      state.subscribed.clear();
      if (!state.me) return;
      setStatus("reconnecting");
      setTimeout(connect, 1000);
    };
  }

  function send(message) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  // Only what is on screen is subscribed: the sensor list's page, or the one sensor.
  function wanted() {
    if (state.view === "sensors") return new Set(state.page.rows.map((r) => r.sensor_id));
    if (state.view === "sensor" && state.sensor) return new Set([state.sensor]);
    return new Set();
  }

  function syncSubscriptions() {
    const want = wanted();
    const drop = [...state.subscribed].filter((s) => !want.has(s));
    const add = [...want].filter((s) => !state.subscribed.has(s));
    for (let i = 0; i < drop.length; i += SUBSCRIBE_CHUNK) {
      if (send({ op: "unsubscribe", sensors: drop.slice(i, i + SUBSCRIBE_CHUNK) })) {
        drop.slice(i, i + SUBSCRIBE_CHUNK).forEach((s) => state.subscribed.delete(s));
      }
    }
    for (let i = 0; i < add.length; i += SUBSCRIBE_CHUNK) {
      const chunk = add.slice(i, i + SUBSCRIBE_CHUNK);
      const since = {};
      for (const s of chunk) if (state.latest.has(s)) since[s] = state.latest.get(s).seq;
      if (send({ op: "subscribe", sensors: chunk, since_seq: since })) chunk.forEach((s) => state.subscribed.add(s));
    }
  }

  function onMessage(m) {
    if (m.type === "prediction") {
      const seen = state.latest.get(m.sensor_id);
      if (seen && seen.seq >= m.seq) return;
      state.latest.set(m.sensor_id, m);
      state.received += 1;
      if (state.view === "sensors") updateRow(m);
      if (state.view === "sensor" && state.sensor === m.sensor_id) onLivePrediction(m);
    } else if (m.type === "drift") {
      if (state.view === "sensor" && state.sensor === m.sensor_id) state.detailAt = 0;
      toast(`drift on ${m.sensor_id} (${m.detector}, ${m.signal})`);
    } else if (m.type === "error") {
      setStatus(`error: ${m.code}`, "error");
    }
  }

  // -- views ------------------------------------------------------------------------

  function showView(name) {
    for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${name}`;
    for (const link of document.querySelectorAll("nav a")) {
      link.classList.toggle("active", link.dataset.view === name || (name === "sensor" && link.dataset.view === "sensors"));
    }
    state.view = name;
  }

  function route() {
    if (!state.me) { showView("signin"); return; }
    const hash = location.hash.slice(1);
    if (hash.startsWith("sensor=")) {
      let id = hash.slice("sensor=".length);
      try { id = decodeURIComponent(id); } catch (_) { /* shown as it came */ }
      if (state.sensor !== id) { state.detail = null; state.detailAt = 0; }
      state.sensor = id;
      showView("sensor");
      $("#sensor-title").textContent = id;
      loadSensor().catch(report);
    } else if (hash === "sensors") {
      showView("sensors");
      loadSensors().catch(report);
    } else {
      showView("overview");
      loadOverview().catch(report);
    }
    syncSubscriptions();
  }

  function report(err) {
    if (err instanceof ApiError && err.status === 401) return;
    toast(err instanceof Error ? err.message : String(err));
  }

  window.addEventListener("hashchange", route);

  // -- overview ---------------------------------------------------------------------

  async function loadOverview() {
    state.due.overview = Date.now() + EVERY.overview;
    const mine = (state.overviewSeq = (state.overviewSeq || 0) + 1);
    const [overview, board, drift, decisions] = await Promise.all([
      api("/v1/overview"),
      api("/v1/leaderboard").catch((err) => ({ failed: err })),
      api("/v1/drift?limit=200").catch((err) => ({ failed: err })),
      api("/v1/decisions?limit=50").catch((err) => ({ failed: err })),
    ]);
    if (mine !== state.overviewSeq || state.view !== "overview") return;
    drawHealth(overview);
    if (!board.failed) drawLeaderboard(board);
    if (!drift.failed) drawDriftTimeline(drift.events);
    if (!decisions.failed) drawDecisions(decisions.decisions);
    $("#view-overview").dataset.loaded = String(Date.now());
  }

  function tile(label, value, key, warn) {
    return el("div", { class: `tile${warn ? " warn" : ""}`, dataset: { metric: key } },
      el("div", { class: "value" }, value), el("div", { class: "label" }, label));
  }

  function drawHealth(o) {
    const p = o.pipeline;
    const dead = Object.values(p.dead_letters).reduce((a, b) => a + b, 0);
    const fallbacks = Object.values(p.fallbacks).reduce((a, b) => a + b, 0);
    const serving = o.serving.filter((s) => s.stage === "production").map((s) => `${s.name} v${s.version}`).join(", ") || "baseline";
    $("#health").replaceChildren(
      tile("readings/s", p.readings_per_second.toFixed(1), "readings_per_second"),
      tile("predictions/s", p.predictions_per_second.toFixed(1), "predictions_per_second"),
      tile("readings accepted", p.readings_total.toLocaleString("en"), "readings_total"),
      tile("consumer lag", p.consumer_lag.toLocaleString("en"), "consumer_lag", p.consumer_lag > 10000),
      tile("batch time (mean / p95)", p.batch.mean_seconds === null ? "–" : `${(1000 * p.batch.mean_seconds).toFixed(1)} / ${p.batch.p95_seconds === null ? "–" : (1000 * p.batch.p95_seconds).toFixed(0)} ms`, "batch"),
      tile("dead letters", dead.toLocaleString("en"), "dead_letters", dead > 0),
      tile("fallbacks", fallbacks.toLocaleString("en"), "fallbacks", fallbacks > 0),
      tile("subscribers", String(p.subscribers), "subscribers"),
      tile("live sensors", o.sensors.toLocaleString("en"), "sensors"),
      tile("drift events", String(p.drift_events), "drift_events", p.drift_events > 0),
      tile("serving", serving, "serving"),
    );
    $("#health-note").textContent = p.worker_in_process
      ? `as of ${when(o.at)} UTC`
      : `as of ${when(o.at)} UTC; the workers run in other processes: their numbers are on their own /metrics`;
    const reasons = (counts) => Object.entries(counts).sort((a, b) => b[1] - a[1])
      .map(([reason, n]) => el("tr", {}, el("td", {}, reason), el("td", { class: "num" }, n.toLocaleString("en"))));
    fill($("#dead-letters tbody"), reasons(p.dead_letters), 2, "none");
    fill($("#fallbacks tbody"), reasons(p.fallbacks), 2, "none");
  }

  function drawLeaderboard(board) {
    $("#leaderboard-range").textContent = `${when(board.start)} – ${when(board.stop)}${board.paired ? " · paired on shadow's steps" : ""}`;
    fill($("#leaderboard tbody"), board.rows.map((r) => el("tr", { dataset: { model: r.model, version: String(r.model_version) } },
      el("td", {}, r.model), el("td", {}, `v${r.model_version}`), el("td", {}, r.stage),
      el("td", { class: "num" }, r.steps.toLocaleString("en")), el("td", { class: "num" }, String(r.sensors)),
      el("td", { class: "num" }, num(r.mae)), el("td", { class: "num" }, pct(r.coverage)))), 7, "no paired errors yet");
    const operator = state.me && state.me.can.models;
    fill($("#models tbody"), board.models.map((m) => {
      const actions = operator ? el("td", { class: "operator-only" },
        m.stage !== "production" ? el("button", { type: "button", class: "promote", dataset: { stage: "production" }, onclick: () => promote(m, "production") }, "→ production") : null,
        m.stage !== "shadow" && m.stage !== "production" ? el("button", { type: "button", class: "promote", dataset: { stage: "shadow" }, onclick: () => promote(m, "shadow") }, "→ shadow") : null) : null;
      return el("tr", { dataset: { model: m.name, version: String(m.version), stage: m.stage } },
        el("td", {}, m.name), el("td", {}, `v${m.version}`), el("td", {}, m.stage), el("td", {}, m.kind || ""),
        el("td", {}, m.created_at ? when(new Date(m.created_at * 1000).toISOString()) : ""), actions);
    }), operator ? 6 : 5, "no trained models: the baseline serves");
  }

  function confirmAction(text) {
    const dialog = $("#confirm");
    $("#confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "cancel";
      dialog.showModal();
    });
  }

  async function promote(model, stage) {
    const text = `Promote ${model.name} v${model.version} to ${stage}?` +
      (stage === "production" ? " The workers switch to it within seconds." : "");
    if (!(await confirmAction(text))) return;
    try {
      const ref = await api(`/v1/models/${encodeURIComponent(model.name)}/${model.version}/promote?stage=${stage}`, { method: "POST" });
      toast(`${ref.name} v${ref.version} is now ${ref.stage}`);
    } catch (err) { report(err); }
    loadOverview().catch(report);
  }

  $("#rollback").addEventListener("click", async () => {
    if (!(await confirmAction("Roll production back to its previous version?"))) return;
    try {
      const ref = await api("/v1/models/rollback?stage=production", { method: "POST" });
      toast(`production is ${ref.name} v${ref.version} again`);
    } catch (err) { report(err); }
    loadOverview().catch(report);
  });

  function drawDriftTimeline(events) {
    const shown = events.slice(0, 25);
    fill($("#drift-timeline tbody"), shown.map((e) => el("tr", { dataset: { sensor: e.sensor_id } },
      el("td", {}, when(e.ts)), el("td", {}, sensorLink(e.sensor_id)), el("td", {}, e.detector),
      el("td", {}, e.signal), el("td", {}, `${e.model} v${e.model_version}`))), 5, "no drift");
    $("#drift-more").textContent = events.length > shown.length ? `the latest ${shown.length} of ${events.length} shown` : "";
    const hours = new Map();
    for (const e of events) {
      const hour = Math.floor(Date.parse(e.ts) / 3600000) * 3600;
      hours.set(hour, (hours.get(hour) || 0) + 1);
    }
    const xs = [...hours.keys()].sort((a, b) => a - b);
    const data = [xs, xs.map((x) => hours.get(x))];
    const box = $("#drift-chart");
    box.dataset.hours = String(xs.length);
    if (state.driftChart) { state.driftChart.destroy(); state.driftChart = null; }
    if (!xs.length) { box.replaceChildren(el("p", { class: "muted" }, "no drift events")); return; }
    box.replaceChildren();
    const bars = uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.8, 24] }) : undefined;
    state.driftChart = new uPlot({
      width: Math.max(box.clientWidth, 280), height: 140, legend: { show: false },
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      scales: { x: { time: true, range: (u, lo, hi) => [lo - 3600, hi + 3600] }, y: { range: (u, lo, hi) => [0, Math.max(1, hi)] } },
      axes: axes("events / hour"),
      series: [{}, { label: "events", stroke: css("--drift"), fill: css("--drift"), paths: bars, points: { show: !bars } }],
    }, data, box);
  }

  function drawDecisions(decisions) {
    fill($("#decisions tbody"), decisions.map((d) => {
      const sensors = Array.isArray(d.detail.sensors) ? d.detail.sensors.map(String) : [];
      const rest = Object.entries(d.detail).filter(([k]) => k !== "sensors")
        .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
      const links = [];
      sensors.forEach((s, i) => { if (i) links.push(", "); links.push(sensorLink(s)); });
      return el("tr", { dataset: { action: d.action } }, el("td", {}, when(d.at)), el("td", {}, d.action),
        el("td", {}, d.model ? `${d.model} v${d.model_version}` : "–"),
        el("td", { class: "wrap" }, ...links, links.length && rest ? " · " : "", rest));
    }), 4, "no decisions yet");
  }

  $("#sql-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#sql-error").textContent = "";
    try {
      const result = await api("/v1/query", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ sql: $("#sql").value, max_rows: 200 }) });
      $("#sql-result thead").replaceChildren(el("tr", {}, result.columns.map((c) => el("th", {}, c))));
      fill($("#sql-result tbody"), result.rows.map((row) => el("tr", {}, row.map((v) => el("td", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))))), Math.max(1, result.columns.length), "no rows");
    } catch (err) {
      $("#sql-error").textContent = err.message;
    }
  });

  // -- sensors: search, sort, pages ---------------------------------------------------

  async function loadSensors() {
    state.due.sensors = Date.now() + EVERY.sensors;
    const params = new URLSearchParams({ match: $("#search").value.trim() || "*", sort: $("#sort").value, offset: String(state.page.offset), limit: String(PAGE) });
    const mine = (state.pageSeq = (state.pageSeq || 0) + 1); // only the latest request draws
    let page;
    try {
      page = await api(`/v1/console/sensors?${params}`);
      if (mine !== state.pageSeq) return;
    } catch (err) {
      if (mine !== state.pageSeq) return;
      if (err instanceof ApiError && err.code === "bad_request") { toast(`search: ${err.message}`); return; }
      throw err;
    }
    if (page.total && page.offset >= page.total) { state.page.offset = Math.max(0, (Math.ceil(page.total / PAGE) - 1) * PAGE); return loadSensors(); }
    state.page = { offset: page.offset, total: page.total, rows: page.sensors };
    const rows = page.sensors.map((r) => el("tr", { dataset: { sensor: r.sensor_id }, onclick: (e) => { if (e.target.tagName !== "A") location.hash = `sensor=${encodeURIComponent(r.sensor_id)}`; } },
      el("td", {}, sensorLink(r.sensor_id)), el("td", { class: "model" }, `${r.model} v${r.model_version}`),
      el("td", { class: "num next" }, num(r.next, 2)), el("td", { class: "num mae" }, num(r.online_mae)),
      el("td", { class: "num coverage" }, pct(r.online_coverage)), el("td", { class: "drift" }, when(r.last_drift)),
      el("td", { class: "num seq" }, String(r.seq))));
    fill($("#sensor-list tbody"), rows, 7, "no sensor matches");
    for (const r of page.sensors) if (state.latest.has(r.sensor_id)) updateRow(state.latest.get(r.sensor_id));
    const last = Math.min(page.offset + PAGE, page.total);
    $("#page-info").textContent = page.total ? `${page.offset + 1}-${last} of ${page.total.toLocaleString("en")}` : "0 of 0";
    $("#prev").disabled = page.offset === 0;
    $("#next").disabled = last >= page.total;
    $("#view-sensors").dataset.loaded = String(Date.now());
    syncSubscriptions();
  }

  function updateRow(m) {
    for (const row of document.querySelectorAll("#sensor-list tbody tr[data-sensor]")) {
      if (row.dataset.sensor !== m.sensor_id) continue;
      row.querySelector(".next").textContent = num(m.yhat[0], 2);
      row.querySelector(".seq").textContent = String(m.seq);
      row.querySelector(".model").textContent = `${m.model} v${m.model_version}`;
    }
  }

  $("#search-form").addEventListener("submit", (event) => { event.preventDefault(); state.page.offset = 0; loadSensors().catch(report); });
  $("#search").addEventListener("change", () => { state.page.offset = 0; loadSensors().catch(report); });
  $("#sort").addEventListener("change", () => { state.page.offset = 0; loadSensors().catch(report); });
  $("#prev").addEventListener("click", () => { state.page.offset = Math.max(0, state.page.offset - PAGE); loadSensors().catch(report); });
  $("#next").addEventListener("click", () => { state.page.offset += PAGE; loadSensors().catch(report); });

  // -- one sensor -------------------------------------------------------------------

  function rangeParams() {
    const choice = $("#range").value;
    const params = new URLSearchParams();
    if (choice === "custom") {
      if ($("#range-from").value) params.set("from", `${$("#range-from").value}Z`);
      if ($("#range-to").value) params.set("to", `${$("#range-to").value}Z`);
      params.set("limit", "10000");
    } else if (choice !== "live") {
      const detail = state.detail;
      const newest = detail && detail.actuals.ts.length ? detail.actuals.ts[detail.actuals.ts.length - 1] : Date.now() / 1000;
      params.set("from", new Date((newest - Number(choice) * 86400) * 1000).toISOString());
      params.set("limit", "10000");
    }
    return params;
  }

  // Live: the range reaches the newest readings (no end chosen), so live forecasts apply.
  const isLive = () => $("#range").value !== "custom" || !$("#range-to").value;

  async function loadSensor() {
    const id = state.sensor;
    state.due.sensor = Date.now() + EVERY.sensor;
    state.detailAt = Date.now();
    const path = `/v1/console/sensors/${encodeURIComponent(id)}`;
    const relative = !["live", "custom"].includes($("#range").value);
    if (relative && !state.detail) state.detail = await api(`${path}?limit=1`); // the newest reading
    const mine = (state.detailSeq = (state.detailSeq || 0) + 1);
    const detail = await api(`${path}?${rangeParams()}`);
    if (state.sensor !== id || mine !== state.detailSeq) return;
    state.detail = detail;
    const live = state.latest.get(id);
    if (live && (!detail.forecast || live.seq > detail.forecast.seq)) detail.forecast = live;
    drawSensor();
  }

  function onLivePrediction(m) {
    if (!state.detail) return;
    if (isLive()) {
      state.detail.forecast = m;
      drawSensor();
      state.due.sensor = Math.min(state.due.sensor || 0, state.detailAt + DETAIL_AFTER_PREDICTION);
    }
  }

  $("#range").addEventListener("change", () => {
    const custom = $("#range").value === "custom";
    $("#range-from").hidden = !custom;
    $("#range-to").hidden = !custom;
    if (!custom) { $("#range-to").value = ""; loadSensor().catch(report); }
  });
  $("#range-form").addEventListener("submit", (event) => { event.preventDefault(); loadSensor().catch(report); });

  function chartData(detail) {
    const f = isLive() ? detail.forecast : null;
    const points = new Map();
    const at = (x) => { if (!points.has(x)) points.set(x, [null, null, null, null]); return points.get(x); };
    detail.actuals.ts.forEach((x, i) => { at(x)[0] = detail.actuals.value[i]; });
    let origin = null;
    const targets = [];
    if (f) {
      origin = Date.parse(f.ts) / 1000;
      const start = at(origin);
      if (start[0] !== null) { start[1] = start[0]; start[2] = start[0]; start[3] = start[0]; }
      f.yhat.forEach((y, i) => {
        const x = origin + (i + 1) * f.step_seconds;
        targets.push(x);
        const p = at(x);
        p[1] = y; p[2] = f.lower[i]; p[3] = f.upper[i];
      });
    }
    const xs = [...points.keys()].sort((a, b) => a - b);
    const series = [0, 1, 2, 3].map((k) => xs.map((x) => points.get(x)[k]));
    return {
      sensor: detail.sensor_id,
      data: [xs, ...series],
      origin,
      targets,
      forecast: f,
      drift: detail.drift.map((e) => ({ ts: Date.parse(e.ts) / 1000, detector: e.detector, signal: e.signal })),
      stretches: detail.stretches.map((s) => ({ ...s, from: Date.parse(s.start) / 1000, to: Date.parse(s.stop) / 1000 })),
    };
  }

  function axes(yLabel) {
    const stroke = css("--muted");
    const grid = { stroke: css("--line"), width: 1 };
    return [
      { stroke, grid, ticks: grid, label: "time (UTC)", labelSize: 18 },
      { stroke, grid, ticks: grid, label: yLabel, labelSize: 18, size: 56 },
    ];
  }

  function drawMarks(u) {
    const marks = state.chartMarks;
    if (!marks || u.scales.x.min === null) return;
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const px = devicePixelRatio || 1;
    const x = (v) => u.valToPos(v, "x", true);
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    ctx.font = `${11 * px}px system-ui, sans-serif`;
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    const colors = [css("--stretch-a"), css("--stretch-b")];
    marks.stretches.forEach((s) => {
      const a = Math.max(x(s.from), left), b = Math.max(x(s.to), a + 3 * px);
      ctx.fillStyle = s.fallback ? css("--fallback") : colors[s.model === "baseline" ? 0 : 1];
      ctx.fillRect(a, top + height - 6 * px, b - a, 6 * px);
      if (b - a > 60 * px) {
        ctx.fillStyle = css("--muted");
        ctx.fillText(`${s.model} v${s.model_version}${s.fallback ? " (fallback)" : ""}`, a + 3 * px, top + height - 9 * px);
      }
    });
    const labelled = []; // [from, to, row] of the labels drawn: an overlapping one goes lower
    const line = (v, color, label, dash) => {
      const pos = x(v);
      if (pos < left || pos > left + width) return;
      const text = width < 500 * px ? label.split(" ")[0] : label;
      const room = ctx.measureText(text).width + 6 * px;
      const at = pos + room > left + width ? pos - room + 3 * px : pos + 3 * px; // inside the plot
      let row = 0;
      while (labelled.some(([a, b, r]) => r === row && at < b && a < at + room)) row += 1;
      labelled.push([at, at + room, row]);
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = 1.5 * px;
      ctx.setLineDash(dash.map((d) => d * px));
      ctx.beginPath();
      ctx.moveTo(pos, top);
      ctx.lineTo(pos, top + height);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillText(text, at, top + (12 + 13 * row) * px);
    };
    if (marks.origin !== null) line(marks.origin, css("--origin"), "forecast from", [2, 2]);
    for (const d of marks.drift) line(d.ts, css("--drift"), `drift (${d.signal})`, [4, 3]);
    ctx.restore();
  }

  function drawSensor() {
    const detail = state.detail;
    const built = chartData(detail);
    const box = $("#chart");
    const f = built.forecast;
    $("#sensor-model").textContent = f ? `${f.model} v${f.model_version} · #${f.seq}` : "no live forecast";
    box.dataset.actualPoints = String(detail.actuals.ts.length);
    box.dataset.forecastPoints = String(built.targets.length);
    box.dataset.driftMarks = String(built.drift.length);
    box.dataset.seq = f ? String(f.seq) : "";
    state.chartMarks = built;
    const width = Math.max(box.clientWidth, 280);
    const height = box.clientWidth < 500 ? 240 : 320;
    if (state.chart && state.chart._theme === document.documentElement.dataset.theme && state.chart.width === width) {
      state.chart.setData(built.data, true);
    } else {
      if (state.chart) state.chart.destroy();
      box.replaceChildren();
      const band = css("--band");
      state.chart = new uPlot({
        width, height,
        tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
        scales: { x: { time: true } },
        axes: axes("value"),
        series: [
          {},
          { label: "actual", stroke: css("--actual"), width: 1.5, spanGaps: true, points: { show: false } },
          { label: "forecast", stroke: css("--forecast"), width: 2, dash: [6, 3], spanGaps: true, points: { show: false } },
          { label: "lower", stroke: band, width: 1, spanGaps: true, points: { show: false } },
          { label: "upper", stroke: band, width: 1, spanGaps: true, points: { show: false } },
        ],
        bands: [{ series: [4, 3], fill: band }],
        hooks: { draw: [drawMarks] },
      }, built.data, box);
      state.chart._theme = document.documentElement.dataset.theme;
    }
    fill($("#stretches"), built.stretches.map((s) => el("li", { class: s.fallback ? "fallback" : s.model === "baseline" ? "" : "model" },
      `${s.model} v${s.model_version}${s.fallback ? " (fallback)" : ""}: ${when(s.start)} → ${when(s.stop)}, ${s.forecasts} forecasts`)), 1, "no stored forecasts in this range");
    fill($("#online tbody"), detail.online.map((o) => el("tr", {}, el("td", {}, o.model), el("td", { class: "num" }, String(o.horizon)),
      el("td", { class: "num" }, num(o.mae)), el("td", { class: "num" }, pct(o.coverage)))), 4, "no residuals yet");
    $("#stored-error").textContent = detail.errors.steps
      ? `stored, step 1 over this range: MAE ${num(detail.errors.mae)}, coverage ${pct(detail.errors.coverage)} (${detail.errors.steps} steps)`
      : "no stored errors in this range yet";
    fill($("#sensor-drift"), detail.drift.map((e) => el("li", {}, `${when(e.ts)} · ${e.detector} (${e.signal}) · ${e.model} v${e.model_version}`)), 1, "no drift in this range");
  }

  window.addEventListener("resize", () => {
    clearTimeout(state.resizeTimer);
    state.resizeTimer = setTimeout(() => { if (state.view === "sensor" && state.detail) drawSensor(); }, 200);
  });

  // -- theme ------------------------------------------------------------------------

  function applyTheme(theme) {
    document.documentElement.dataset.theme = theme;
    $("#theme").textContent = theme === "dark" ? "☀ light" : "☾ dark";
    localStorage.setItem("forecast.theme", theme);
    if (state.view === "sensor" && state.detail) drawSensor();
    if (state.view === "overview" && state.me) loadOverview().catch(report);
  }
  $("#theme").addEventListener("click", () => applyTheme(document.documentElement.dataset.theme === "dark" ? "light" : "dark"));
  applyTheme(localStorage.getItem("forecast.theme") || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));

  // -- refresh ------------------------------------------------------------------------

  setInterval(() => {
    if (!state.me || document.hidden) return;
    const now = Date.now();
    if (state.view === "overview" && now >= (state.due.overview || 0)) loadOverview().catch(report);
    if (state.view === "sensors" && now >= (state.due.sensors || 0)) loadSensors().catch(report);
    if (state.view === "sensor" && isLive() && now >= (state.due.sensor || 0)) loadSensor().catch(report);
  }, 1000);

  // What tests and curious operators can read: the chart's data, the subscriptions.
  window.__console = {
    chart: () => {
      const m = state.chartMarks;
      if (!m) return null;
      return {
        sensor: m.sensor, x: m.data[0], actual: m.data[1], yhat: m.data[2], lower: m.data[3], upper: m.data[4],
        origin: m.origin, targets: m.targets, forecast: m.forecast,
        drift: m.drift.map((d) => d.ts), stretches: m.stretches,
        scale: state.chart ? { min: state.chart.scales.x.min, max: state.chart.scales.x.max } : null,
      };
    },
    subscribed: () => [...state.subscribed].sort(),
    received: () => state.received,
    refresh: () => route(),
  };

  // -- start: a token from the link (#token=...&ws=...), the session, or the form -----

  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("ws")) state.wsPort = params.get("ws");
  $("#ws-input").value = state.wsPort || "8765";
  const linked = params.get("token");
  if (linked) {
    state.token = linked;
    history.replaceState(null, "", `${location.pathname}${location.search}#overview`);
  }
  if (state.token) {
    signIn(state.token, state.wsPort).then(route).catch((err) => {
      signOut(err instanceof ApiError ? `refused: ${err.message}` : String(err));
    });
  } else {
    signOut("");
  }
})();
