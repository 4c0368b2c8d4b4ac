// The mqttd dashboard. Everything it shows comes from the admin API under /api/v1/, called
// with the API key the user signed in with (kept in this tab's sessionStorage). The DOM is
// built with createElement and textContent only: client ids, topics and payloads are data,
// never markup.

const KEY_STORAGE = "mqttd.apiKey";
const API = "/api/v1/";
const POLL_MS = 1000;
const HISTORY = 120; // samples kept for the charts: two minutes at one a second
const TRANSPORTS = ["tcp", "tls", "ws", "wss", "quic", "p2p", "bridge"];

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  page: null,
  stats: null,
  samples: [], // {t, stats} as polled
  pollTimer: null,
  listTimer: null,
  selectedClient: null,
  clientsPage: 1,
  selectedTopic: null,
  seenTransports: new Set(),
};

// ---- DOM helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** An element with attributes (`class`, `testid`, `on<event>`, others as is) and children. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "testid") el.dataset.testid = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const numberFormat = new Intl.NumberFormat();
function fmtNum(n) {
  if (n === null || n === undefined) return "–";
  return numberFormat.format(n);
}
function fmtRate(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  return n >= 100 ? numberFormat.format(Math.round(n)) : n.toFixed(n >= 10 ? 1 : 2);
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}
function plural(n, one, many) {
  return `${fmtNum(n)} ${n === 1 ? one : many}`;
}
function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  const d = Math.floor(s / 86400);
  const hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = Math.floor(s % 60);
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${mm}m`;
  if (mm) return `${mm}m ${ss}s`;
  return `${ss}s`;
}
function fmtAgo(unix) {
  if (!unix) return "–";
  return `${fmtDuration(Math.max(0, Date.now() / 1000 - unix))} ago`;
}
function fmtTime(unix) {
  if (!unix) return "–";
  return new Date(unix * 1000).toLocaleString();
}

function toast(message, bad = false) {
  const el = h("div", { class: bad ? "toast bad" : "toast", testid: "toast" }, message);
  $("toasts").append(el);
  setTimeout(() => el.remove(), bad ? 8000 : 3000);
}

/** Asks the user to confirm in the page's dialog; resolves to true or false. */
function confirmAction(title, text, okLabel) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").removeEventListener("click", ok);
      $("confirm-cancel").removeEventListener("click", cancel);
      dialog.removeEventListener("cancel", cancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const ok = () => done(true);
    const cancel = () => done(false);
    $("confirm-ok").addEventListener("click", ok);
    $("confirm-cancel").addEventListener("click", cancel);
    dialog.addEventListener("cancel", cancel);
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

// ---- The API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", body, key = state.key } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, "network", "The broker cannot be reached.");
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const code = (data && data.code) || `http_${response.status}`;
    const message = (data && data.message) || response.statusText;
    const error = new ApiError(response.status, code, message);
    // A key revoked while signed in: back to the sign-in form.
    if (response.status === 401 && key === state.key) signOut("The API key is no longer valid.");
    throw error;
  }
  return data;
}

/** A path segment: the client id or topic level as the URL carries it. */
const seg = (s) => encodeURIComponent(s);
/** A topic as the retained path carries it: each level encoded, the slashes kept. */
const topicPath = (t) => t.split("/").map(seg).join("/");

// ---- Sign in -------------------------------------------------------------------------------

function showLogin(message) {
  stopPolling();
  $("app").hidden = true;
  $("login").hidden = false;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("login-key").focus();
}

function signOut(message) {
  state.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  state.samples = [];
  showLogin(message);
}

async function signIn(event) {
  event.preventDefault();
  const key = $("login-key").value.trim();
  const error = $("login-error");
  const button = event.submitter || document.querySelector("#login-form button");
  button.disabled = true;
  try {
    await api("stats", { key });
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("login-key").value = "";
    startApp();
  } catch (e) {
    error.hidden = false;
    if (e.status === 401) error.textContent = "That API key is not valid.";
    else if (e.status === 429)
      error.textContent = "Too many failed attempts from this address: wait a few seconds.";
    else error.textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

// ---- Pages ---------------------------------------------------------------------------------

const PAGES = {
  overview: { render: renderOverview },
  clients: { load: loadClients, every: 2000 },
  retained: { load: loadRetained, every: 5000 },
  listeners: { load: loadListeners, every: 3000 },
  network: { load: loadNetwork, every: 3000 },
};

function startApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  route();
  startPolling();
}

function route() {
  if (!state.key) return;
  let page = location.hash.replace(/^#/, "");
  if (!(page in PAGES)) page = "overview";
  state.page = page;
  for (const name of Object.keys(PAGES)) $(`page-${name}`).hidden = name !== page;
  for (const a of document.querySelectorAll(".tabs a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  clearTimeout(state.listTimer);
  refreshPage();
}

/** Loads the current page now, then again every so often while it is shown. */
async function refreshPage() {
  clearTimeout(state.listTimer);
  const page = state.page;
  const spec = PAGES[page];
  if (spec.render) spec.render();
  if (spec.load) {
    try {
      await spec.load();
    } catch (e) {
      if (e.status !== 401) toast(e.message, true);
    }
    if (state.page === page && state.key && spec.every) {
      state.listTimer = setTimeout(refreshPage, spec.every);
    }
  }
}

// ---- Stats, figures and charts -------------------------------------------------------------

function startPolling() {
  stopPolling();
  poll();
}

function stopPolling() {
  clearTimeout(state.pollTimer);
  clearTimeout(state.listTimer);
  state.pollTimer = null;
}

async function poll() {
  const live = $("live");
  try {
    const stats = await api("stats");
    state.stats = stats;
    state.samples.push({ t: performance.now() / 1000, stats });
    if (state.samples.length > HISTORY + 1) state.samples.shift();
    for (const [t, n] of Object.entries(stats.clients_by_transport || {})) {
      if (n > 0) state.seenTransports.add(t);
    }
    live.textContent = "live";
    live.className = "live ok";
    if (state.page === "overview") renderOverview();
  } catch (e) {
    live.textContent = e.status === 0 ? "unreachable" : "error";
    live.className = "live bad";
  }
  if (state.key) state.pollTimer = setTimeout(poll, POLL_MS);
}

/** Per-second rates of a counter between consecutive samples. */
function rates(pick) {
  const out = [];
  for (let i = 1; i < state.samples.length; i++) {
    const a = state.samples[i - 1];
    const b = state.samples[i];
    const dt = b.t - a.t;
    const d = pick(b.stats) - pick(a.stats);
    // A restarted broker's counters start again from 0: no negative rate.
    out.push(dt > 0 && d >= 0 ? d / dt : 0);
  }
  return out;
}
const levels = (pick) => state.samples.slice(1).map((s) => pick(s.stats));
const last = (xs) => (xs.length ? xs[xs.length - 1] : null);

function figure(label, value, sub, testid) {
  return h(
    "div",
    { class: "figure", testid },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value),
    sub ? h("div", { class: "sub" }, sub) : null,
  );
}

function renderOverview() {
  const s = state.stats;
  if (!s) return;
  $("uptime").textContent = `up ${fmtDuration(s.uptime_seconds)}`;
  const inRate = rates((x) => x.messages_received);
  const outRate = rates((x) => x.messages_sent);
  const dropRate = rates((x) => x.messages_dropped);
  $("figures").replaceChildren(
    figure("Clients connected", fmtNum(s.clients_connected), plural(s.connections_open, "connection open", "connections open"), "figure-clients"),
    figure("Sessions", fmtNum(s.sessions), `${fmtNum(s.persistent_sessions)} persistent`, "figure-sessions"),
    figure("Subscriptions", fmtNum(s.subscriptions), null, "figure-subscriptions"),
    figure("Retained", fmtNum(s.retained_messages), fmtBytes(s.retained_bytes), "figure-retained"),
    figure("Messages in / s", fmtRate(last(inRate)), `${fmtNum(s.messages_received)} in all`, "figure-in"),
    figure("Messages out / s", fmtRate(last(outRate)), `${fmtNum(s.messages_sent)} in all`, "figure-out"),
    figure("Dropped", fmtNum(s.messages_dropped), `${fmtRate(last(dropRate))} / s now`, "figure-dropped"),
    figure("Traffic", fmtBytes(s.bytes_received), `in, ${fmtBytes(s.bytes_sent)} out`, "figure-bytes"),
  );
  drawChart("connections", [
    { name: "clients", values: levels((x) => x.clients_connected) },
    { name: "connections", values: levels((x) => x.connections_open) },
  ]);
  drawChart("messages", [
    { name: "in", values: inRate, rate: true },
    { name: "out", values: outRate, rate: true },
  ]);
  drawChart("dropped", [{ name: "dropped", values: dropRate, rate: true, color: 4 }]);
  const shown = TRANSPORTS.filter((t) => state.seenTransports.has(t));
  drawChart(
    "transports",
    (shown.length ? shown : ["tcp"]).map((t) => ({
      name: t,
      values: levels((x) => (x.clients_by_transport || {})[t] || 0),
      color: TRANSPORTS.indexOf(t) + 1,
    })),
  );
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** Draws lines of `series` ({name, values, color?, rate?}) on the chart's canvas. */
function drawChart(id, series) {
  const canvas = $(`chart-${id}`);
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);

  // Some room above the highest point, so that a flat line is not drawn on the frame.
  const max = Math.max(1, ...series.flatMap((s) => s.values)) * 1.15;
  const top = niceCeil(max);
  const left = 44;
  const right = 8;
  const bottom = 18;
  const plotW = width - left - right;
  const plotH = height - bottom - 6;
  const x = (i) => left + (plotW * (i + HISTORY - (series[0].values.length))) / (HISTORY - 1);
  const y = (v) => 6 + plotH - (plotH * v) / top;

  ctx.font = `11px ${getComputedStyle(document.body).fontFamily}`;
  ctx.fillStyle = cssVar("--muted");
  ctx.strokeStyle = cssVar("--grid");
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, yy);
    ctx.lineTo(width - right, yy);
    ctx.stroke();
    ctx.fillText(fmtAxis(v), left - 6, yy);
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  ctx.fillText(`${HISTORY} s ago`, left, height - 3);
  ctx.textAlign = "right";
  ctx.fillText("now", width - right, height - 3);

  const legend = [];
  series.forEach((s, n) => {
    const color = s.color || n + 1;
    ctx.strokeStyle = cssVar(`--series-${color}`);
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    s.values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
    const now = last(s.values);
    if (now !== null) {
      // The latest point, visible even before there is a line.
      ctx.fillStyle = ctx.strokeStyle;
      ctx.beginPath();
      ctx.arc(x(s.values.length - 1), y(now), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
    legend.push(
      h("span", {}, h("i", { class: `swatch-${color}` }), `${s.name} ${s.rate ? fmtRate(now) : fmtNum(now)}`),
    );
  });
  $(`legend-${id}`).replaceChildren(...legend);
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 4, 6, 8, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}
function fmtAxis(v) {
  if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return `${+v.toFixed(2)}`;
}

window.addEventListener("resize", () => {
  if (state.page === "overview") renderOverview();
});

// ---- Clients -------------------------------------------------------------------------------

let searchDebounce = null;

const CLIENTS_PER_PAGE = 50;

async function loadClients() {
  const params = new URLSearchParams({ limit: String(CLIENTS_PER_PAGE), page: String(state.clientsPage) });
  const prefix = $("clients-search").value.trim();
  if (prefix) params.set("client_id_prefix", prefix);
  if ($("clients-connected").checked) params.set("connected", "true");
  const list = await api(`clients?${params}`);
  const rows = list.data.map((c) =>
    h(
      "tr",
      {
        testid: "client-row",
        "data-client-id": c.client_id,
        class: c.client_id === state.selectedClient ? "selected" : null,
        onclick: () => selectClient(c.client_id),
      },
      h("td", { class: "id" }, c.client_id),
      h(
        "td",
        {},
        c.connected
          ? h("span", { class: "badge ok" }, "connected")
          : h("span", { class: "badge" }, "offline"),
      ),
      h("td", {}, c.transport || "–"),
      h("td", { class: "hide-s hide-m mono" }, c.peer_addr || "–"),
      h("td", { class: "hide-s hide-m" }, c.protocol_version || "–"),
      h("td", { class: "hide-s nowrap" }, c.connected ? fmtAgo(c.connected_at) : fmtAgo(c.disconnected_at)),
      h("td", { class: "num" }, fmtNum(c.subscriptions)),
      h("td", { class: "num" }, fmtNum(c.queued)),
      h(
        "td",
        { class: "actions" },
        c.connected
          ? h(
              "button",
              {
                type: "button",
                class: "small link-danger",
                testid: "client-kick",
                title: "Disconnect this client",
                onclick: (e) => {
                  e.stopPropagation();
                  kick(c.client_id);
                },
              },
              "Kick",
            )
          : null,
      ),
    ),
  );
  $("clients-body").replaceChildren(...rows);
  $("clients-empty").hidden = rows.length > 0;
  const pages = Math.max(1, Math.ceil(list.meta.count / list.meta.limit));
  if (state.clientsPage > pages) {
    // The list shrank under this page: show its last one.
    state.clientsPage = pages;
    return loadClients();
  }
  $("clients-pager").hidden = pages <= 1;
  $("clients-page").textContent = `page ${fmtNum(list.meta.page)} of ${fmtNum(pages)}`;
  $("clients-prev").disabled = list.meta.page <= 1;
  $("clients-next").disabled = !list.meta.has_next;
  const shown = pages > 1 ? ` (${fmtNum(list.data.length)} on this page)` : "";
  $("clients-count").textContent = `${fmtNum(list.meta.count)} ${list.meta.count === 1 ? "client" : "clients"}${shown}`;
  if (state.selectedClient) await showClient(state.selectedClient, false);
}

async function selectClient(id) {
  state.selectedClient = id;
  for (const row of document.querySelectorAll("#clients-body tr")) {
    row.classList.toggle("selected", row.dataset.clientId === id);
  }
  await showClient(id, true);
}

function closeClient() {
  state.selectedClient = null;
  $("client-detail").hidden = true;
  $("client-detail").parentElement.classList.remove("with-detail");
  for (const row of document.querySelectorAll("#clients-body tr.selected")) row.classList.remove("selected");
}

async function showClient(id, report) {
  const panel = $("client-detail");
  let c;
  try {
    c = await api(`clients/${seg(id)}`);
  } catch (e) {
    if (e.status === 404) {
      panel.replaceChildren(
        detailHead(id, closeClient),
        h("p", { class: "muted" }, "This client's session has ended."),
      );
    } else if (report) toast(e.message, true);
    return;
  }
  if (state.selectedClient !== id) return;
  const kv = [
    ["State", c.connected ? "connected" : "offline"],
    ["User name", c.username],
    ["Transport", c.transport],
    ["Listener", c.listener],
    ["Address", c.peer_addr],
    ["MQTT", c.protocol_version],
    ["Keep alive", c.keep_alive === null || c.keep_alive === undefined ? null : `${c.keep_alive} s`],
    ["Clean start", c.clean_start === null || c.clean_start === undefined ? null : c.clean_start ? "yes" : "no"],
    ["Persistent session", c.persistent ? "yes" : "no"],
    ["Session expiry", c.session_expiry_interval === null || c.session_expiry_interval === undefined ? null : `${fmtNum(c.session_expiry_interval)} s`],
    ["TLS / node identity", c.tls_identity],
    ["Connected at", c.connected ? fmtTime(c.connected_at) : null],
    ["Disconnected at", c.disconnected_at ? fmtTime(c.disconnected_at) : null],
    ["Queued", fmtNum(c.queued)],
    ["In flight", fmtNum(c.in_flight)],
    ["Bytes in / out", c.bytes_in === null || c.bytes_in === undefined ? null : `${fmtBytes(c.bytes_in)} / ${fmtBytes(c.bytes_out)}`],
    ["Messages in / out", c.messages_in === null || c.messages_in === undefined ? null : `${fmtNum(c.messages_in)} / ${fmtNum(c.messages_out)}`],
    // A QUIC or p2p:// client's path, read from its QUIC statistics now.
    ...(c.quic
      ? [
          ["Path now", c.quic.remote_addr || (c.quic.relay ? `relayed via ${c.quic.relay}` : null)],
          ["Round trip", `${c.quic.rtt_ms.toFixed(1)} ms`],
          ["Congestion window", fmtBytes(c.quic.cwnd)],
          ["Packets sent / lost", `${fmtNum(c.quic.sent_packets)} / ${fmtNum(c.quic.lost_packets)}`],
          ["Datagrams received", fmtNum(c.quic.received_datagrams)],
        ]
      : []),
  ].filter(([, v]) => v !== null && v !== undefined);
  const subs = c.subscription_list || [];
  panel.replaceChildren(
    detailHead(id, closeClient),
    h("dl", { class: "kv", testid: "client-detail-fields" }, kv.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("h3", {}, `Subscriptions (${subs.length})`),
    subs.length
      ? h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { testid: "client-subscriptions" },
            h("thead", {}, h("tr", {}, h("th", {}, "Filter"), h("th", { class: "num" }, "QoS"), h("th", {}, "Options"))),
            h(
              "tbody",
              {},
              subs.map((s) =>
                h(
                  "tr",
                  {},
                  h("td", { class: "id" }, s.filter),
                  h("td", { class: "num" }, s.qos),
                  h(
                    "td",
                    { class: "small muted" },
                    [
                      s.no_local ? "no local" : null,
                      s.retain_as_published ? "retain as published" : null,
                      s.retain_handling ? `retain handling ${s.retain_handling}` : null,
                      s.subscription_id ? `id ${s.subscription_id}` : null,
                    ]
                      .filter(Boolean)
                      .join(", ") || "–",
                  ),
                ),
              ),
            ),
          ),
        )
      : h("p", { class: "muted" }, "No subscriptions."),
    c.connected
      ? h(
          "div",
          { class: "actions" },
          h("button", { type: "button", class: "danger", testid: "detail-kick", onclick: () => kick(id) }, "Kick"),
        )
      : null,
  );
  panel.hidden = false;
  panel.parentElement.classList.add("with-detail");
}

function detailHead(title, close) {
  return h(
    "div",
    { class: "detail-head" },
    h("h3", {}, title),
    h("button", { type: "button", class: "ghost small", "aria-label": "Close", onclick: close }, "✕"),
  );
}

async function kick(id) {
  const sure = await confirmAction(
    "Disconnect client?",
    `${id} will be disconnected (MQTT 5: DISCONNECT with reason 0x98, administrative action). ` +
      "A persistent session stays, offline; the client may reconnect.",
    "Kick",
  );
  if (!sure) return;
  try {
    await api(`clients/${seg(id)}`, { method: "DELETE" });
    toast(`Disconnected ${id}`);
  } catch (e) {
    toast(e.message, true);
  }
  await refreshPage();
}

// ---- Retained messages ---------------------------------------------------------------------

async function loadRetained() {
  const filter = $("retained-filter").value.trim() || "#";
  const list = await api(`retained?${new URLSearchParams({ filter, limit: "500" })}`);
  const rows = list.data.map((m) =>
    h(
      "tr",
      {
        testid: "retained-row",
        "data-topic": m.topic,
        class: m.topic === state.selectedTopic ? "selected" : null,
        onclick: () => viewRetained(m.topic),
      },
      h("td", { class: "id" }, m.topic),
      h("td", { class: "num" }, m.qos),
      h("td", { class: "num" }, fmtBytes(m.payload_bytes)),
      h(
        "td",
        { class: "actions" },
        h(
          "button",
          {
            type: "button",
            class: "small link-danger",
            testid: "retained-delete",
            onclick: (e) => {
              e.stopPropagation();
              deleteRetained(m.topic);
            },
          },
          "Delete",
        ),
      ),
    ),
  );
  $("retained-body").replaceChildren(...rows);
  $("retained-empty").hidden = rows.length > 0;
  const more = list.meta.has_next ? ` (first ${list.data.length} shown)` : "";
  $("retained-count").textContent = `${fmtNum(list.meta.count)} matching ${filter}${more}`;
}

function closeRetained() {
  state.selectedTopic = null;
  $("retained-view").hidden = true;
  $("retained-view").parentElement.classList.remove("with-detail");
  for (const row of document.querySelectorAll("#retained-body tr.selected")) row.classList.remove("selected");
}

async function viewRetained(topic) {
  state.selectedTopic = topic;
  for (const row of document.querySelectorAll("#retained-body tr")) {
    row.classList.toggle("selected", row.dataset.topic === topic);
  }
  const panel = $("retained-view");
  let m;
  try {
    m = await api(`retained/${topicPath(topic)}`);
  } catch (e) {
    toast(e.message, true);
    return;
  }
  panel.replaceChildren(
    detailHead(topic, closeRetained),
    h(
      "dl",
      { class: "kv" },
      h("dt", {}, "QoS"),
      h("dd", {}, m.qos),
      h("dt", {}, "Encoding"),
      h("dd", {}, m.payload_encoding === "plain" ? "UTF-8 text" : "binary (shown in base64)"),
      m.content_type ? [h("dt", {}, "Content type"), h("dd", {}, m.content_type)] : null,
    ),
    h("pre", { class: "payload", testid: "retained-payload" }, m.payload),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "button", class: "danger", testid: "retained-view-delete", onclick: () => deleteRetained(topic) }, "Delete"),
    ),
  );
  panel.hidden = false;
  panel.parentElement.classList.add("with-detail");
}

async function deleteRetained(topic) {
  const sure = await confirmAction(
    "Delete retained message?",
    `The message retained on ${topic} will be deleted, as an empty retained publication would. New subscribers will no longer receive it.`,
    "Delete",
  );
  if (!sure) return;
  try {
    await api(`retained/${topicPath(topic)}`, { method: "DELETE" });
    toast(`Deleted the message retained on ${topic}`);
    if (state.selectedTopic === topic) closeRetained();
  } catch (e) {
    toast(e.message, true);
  }
  await refreshPage();
}

// ---- Listeners -----------------------------------------------------------------------------

async function loadListeners() {
  const listeners = await api("listeners");
  $("listeners-body").replaceChildren(
    ...listeners.map((l) =>
      h(
        "tr",
        { testid: "listener-row", "data-kind": l.kind },
        h("td", { class: "id" }, l.url),
        h("td", {}, h("span", { class: "badge" }, l.kind)),
        h("td", { class: "mono" }, l.addr),
        h("td", { class: "num" }, ["http", "relay"].includes(l.kind) ? "–" : fmtNum(l.clients)),
        ...(["http", "relay"].includes(l.kind)
          ? ["–", "–", "–"].map((t) => h("td", { class: "num hide-s" }, t))
          : [
              h("td", { class: "num hide-s", testid: "listener-connections" }, fmtNum(l.connections_total)),
              h("td", { class: "num hide-s" }, `${fmtNum(l.messages_in)} / ${fmtNum(l.messages_out)}`),
              h("td", { class: "num hide-s" }, `${fmtBytes(l.bytes_in)} / ${fmtBytes(l.bytes_out)}`),
            ]),
      ),
    ),
  );
  const s = state.stats;
  if (s && s.clients_by_transport) {
    $("transport-figures").replaceChildren(
      ...TRANSPORTS.map((t) => figure(t, fmtNum(s.clients_by_transport[t] || 0), null, `transport-${t}`)),
    );
  }
}

// ---- QUIC, peer to peer, bridges -----------------------------------------------------------

async function loadNetwork() {
  const listeners = await api("listeners");
  const s = state.stats || (await api("stats"));
  const q = s.quic || {};
  const loss = q.sent_packets ? `${((100 * q.lost_packets) / q.sent_packets).toFixed(2)} % lost` : null;
  $("quic-figures").replaceChildren(
    figure("Connections open", fmtNum(q.connections)),
    figure("Handshakes", fmtNum(q.handshakes), `${fmtNum(q.handshake_failures)} failed`),
    figure("Retries sent", fmtNum(q.retries)),
    figure("Packets sent", fmtNum(q.sent_packets), loss),
    figure("Congestion events", fmtNum(q.congestion_events)),
    figure("Address changes", fmtNum(q.path_changes)),
    figure("Streams reset", fmtNum(q.stream_resets)),
  );
  const quic = listeners.filter((l) => l.kind === "quic");
  $("quic-listeners").textContent = quic.length
    ? `QUIC listeners: ${quic.map((l) => `${l.url} (${l.addr})`).join(", ")}`
    : "No quic:// listener is configured.";

  const p = s.p2p || {};
  $("p2p-figures").replaceChildren(
    figure("Connections open", fmtNum(p.connections_open)),
    figure("Refused by allow-list", fmtNum(p.refused)),
    figure("Handshake failures", fmtNum(p.handshake_failures)),
    figure("Pings answered", fmtNum(p.pings)),
  );
  const peers = listeners.filter((l) => l.kind === "p2p" || l.kind === "relay");
  $("p2p-listeners").replaceChildren(
    peers.length
      ? h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            {},
            h("thead", {}, h("tr", {}, h("th", {}, "Listener"), h("th", {}, "Kind"), h("th", {}, "Bound to"), h("th", { class: "num" }, "Clients"))),
            h(
              "tbody",
              {},
              peers.map((l) =>
                h(
                  "tr",
                  { testid: "p2p-listener-row" },
                  h("td", { class: "id" }, l.url),
                  h("td", {}, h("span", { class: "badge" }, l.kind)),
                  h("td", { class: "mono" }, l.addr),
                  h("td", { class: "num" }, l.kind === "p2p" ? fmtNum(l.clients) : "–"),
                ),
              ),
            ),
          ),
        )
      : h("p", { class: "muted" }, "No p2p:// or relay:// listener is configured."),
  );

  const [bridges, links] = await Promise.all([api("bridges"), api("p2p/peers")]);
  $("peers").replaceChildren(
    links.length
      ? h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { testid: "peers-table" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", {}, "Node id"),
                h("th", {}, "Role"),
                h("th", {}, "Path"),
                h("th", { class: "hide-s" }, "Remote"),
                h("th", { class: "num" }, "RTT"),
                h("th", { class: "num hide-s" }, "Lost"),
                h("th", { class: "hide-s" }, "Since"),
              ),
            ),
            h(
              "tbody",
              {},
              links.map((p) =>
                h(
                  "tr",
                  { testid: "peer-row", "data-node-id": p.node_id, "data-path": p.path || "" },
                  h("td", { class: "id mono", title: p.node_id }, `${p.node_id.slice(0, 12)}…`),
                  h("td", { title: `${p.direction}, ${p.name}` }, p.role),
                  h(
                    "td",
                    {},
                    p.path === "direct"
                      ? h("span", { class: "badge ok" }, "direct")
                      : p.path === "relayed"
                        ? h("span", { class: "badge warn" }, "relayed")
                        : h("span", { class: "badge" }, "no path yet"),
                  ),
                  h("td", { class: "mono hide-s wrap-any" }, p.remote || "–"),
                  h("td", { class: "num" }, p.rtt_ms == null ? "–" : `${p.rtt_ms.toFixed(1)} ms`),
                  h("td", { class: "num hide-s" }, fmtNum(p.lost_packets)),
                  h("td", { class: "hide-s nowrap" }, fmtAgo(p.connected_at)),
                ),
              ),
            ),
          ),
        )
      : h("p", { class: "muted", testid: "peers-none" }, "No peer-to-peer link is open."),
  );

  const stateBadge = (b) => {
    const label = b.state.replace("_", " ");
    const kind = b.state === "connected" ? "ok" : b.state === "stopped" ? "bad" : "warn";
    return h("span", { class: `badge ${kind}`, testid: "bridge-state" }, label);
  };
  $("bridges").replaceChildren(
    bridges.length
      ? h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { testid: "bridges-table" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", {}, "Bridge"),
                h("th", {}, "State"),
                h("th", { class: "hide-s" }, "Transport"),
                h("th", {}, "Remote broker"),
                h("th", { class: "num" }, "In"),
                h("th", { class: "num" }, "Out"),
                h("th", { class: "num hide-s" }, "Dropped"),
                h("th", { class: "num hide-s" }, "Queued"),
                h("th", { class: "num hide-s" }, "Reconnects"),
                h("th", { class: "hide-s hide-m" }, "Last error"),
              ),
            ),
            h(
              "tbody",
              {},
              bridges.map((b) =>
                h(
                  "tr",
                  { testid: "bridge-row", "data-bridge": b.name, "data-state": b.state },
                  h("td", { class: "id", title: `session ${b.local_client_id}, topics: ${b.topics.join("; ")}` }, b.name),
                  h(
                    "td",
                    { class: "nowrap", title: b.retry_at ? `next attempt ${fmtTime(b.retry_at)}` : null },
                    stateBadge(b),
                  ),
                  h("td", { class: "hide-s" }, b.transport),
                  h("td", { class: "mono" }, b.remote || b.urls.join(", ")),
                  h("td", { class: "num" }, fmtNum(b.messages_in)),
                  h("td", { class: "num" }, fmtNum(b.messages_out)),
                  h("td", { class: "num hide-s" }, fmtNum(b.messages_dropped)),
                  h("td", { class: "num hide-s" }, fmtNum(b.queued)),
                  h("td", { class: "num hide-s" }, fmtNum(b.reconnects)),
                  h(
                    "td",
                    { class: "hide-s hide-m wrap-any", testid: "bridge-error", title: b.last_error_at ? fmtTime(b.last_error_at) : null },
                    b.last_error || "–",
                  ),
                ),
              ),
            ),
          ),
        )
      : h(
          "p",
          { class: "muted", testid: "bridges-none" },
          "No bridge is configured. Bridges appear here when the configuration file has [[bridge]] tables: each one's state, remote broker and message counts.",
        ),
  );
}

// ---- Start ---------------------------------------------------------------------------------

$("login-form").addEventListener("submit", signIn);
$("logout").addEventListener("click", () => signOut(null));
$("clients-search").addEventListener("input", () => {
  clearTimeout(searchDebounce);
  state.clientsPage = 1;
  searchDebounce = setTimeout(refreshPage, 250);
});
$("clients-connected").addEventListener("change", () => {
  state.clientsPage = 1;
  refreshPage();
});
$("clients-prev").addEventListener("click", () => {
  state.clientsPage = Math.max(1, state.clientsPage - 1);
  refreshPage();
});
$("clients-next").addEventListener("click", () => {
  state.clientsPage += 1;
  refreshPage();
});
$("retained-form").addEventListener("submit", (e) => {
  e.preventDefault();
  closeRetained();
  refreshPage();
});
window.addEventListener("hashchange", route);

if (state.key) startApp();
else showLogin(null);
