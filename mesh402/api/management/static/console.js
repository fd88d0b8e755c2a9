// mesh402 console: plain JavaScript, no build step, nothing loaded from elsewhere.
// Everything it shows comes from this node's management API: /api/status and the /api/events stream
// (snapshot, mesh events, and a "console" event with traffic and money every few seconds).
// Text from the network (peer names, labels, model ids) is only ever set as text, never parsed as HTML.
"use strict";

const S = {
  status: null,          // GET /api/status
  traffic: null,         // "console" events
  money: null,
  known: new Map(),      // node id -> last peer row seen (to show departures after the mesh forgets them)
  gone: new Map(),       // node id -> {row, at}: peers that left the status
  events: [],            // [{t, text, kind}]
  minted: [],            // invites minted from this page: [{token, expires_at, single_use, revoked}]
  es: null,
  refetch: null,
};
const MAX_EVENTS = 60;
const MAX_GONE = 50;

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
function svg(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const kid of kids) if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return el;
}
const $ = (id) => document.getElementById(id);
const short = (id) => (typeof id === "string" ? id.slice(0, 12) : "?");
const str = (v, n = 200) => (typeof v === "string" ? v.slice(0, n) : "");
const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
function bytes(n) {
  n = num(n);
  if (n === null) return "–";
  const u = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${u[i]}`;
}
const ms = (v) => (num(v) === null ? "–" : `${num(v) >= 100 ? num(v).toFixed(0) : num(v).toFixed(1)} ms`);
const fixed = (v, d = 2) => (num(v) === null ? "–" : num(v).toFixed(d));
const clock = (t) => new Date((num(t) || 0) * 1000).toLocaleTimeString();
function colorOf(id) {   // one of 8 colours, by the node's place among the nodes known (distinct up to 8)
  id = fullId(id);
  const all = [...new Set([(S.status || {}).node_id, ...S.known.keys(), ...S.gone.keys()].filter(Boolean))].sort();
  const i = all.indexOf(id);
  if (i >= 0) return `c${i % 8}`;
  let x = 0;
  for (const c of String(id)) x = (x * 31 + c.charCodeAt(0)) >>> 0;
  return `c${x % 8}`;
}
function table(el, head, rows, empty) {
  el.replaceChildren();
  if (!rows.length) {
    el.append(h("caption", { class: "empty", text: empty || "Nothing yet." }));
    return;
  }
  el.append(h("thead", {}, h("tr", {}, head.map(([label, cls]) => h("th", { scope: "col", class: cls || null, text: label })))));
  el.append(h("tbody", {}, rows));
}
function td(v, cls) { return h("td", { class: cls || null }, v instanceof Node ? v : String(v ?? "–")); }
function stateSpan(state) { return h("span", { class: `state ${str(state, 20)}`, text: str(state, 40) }); }
function card(k, v, extra) { return h("div", { class: "card" }, h("div", { class: "k", text: k }), h("div", { class: "v", text: v }), extra || null); }
async function api(path, opts) {
  const r = await fetch(path, { credentials: "same-origin", ...(opts || {}) });
  if (r.status === 401) { showLogin(); throw new Error("console token required"); }
  return r;
}
async function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

// ---------------------------------------------------------------- session

async function start() {
  let s;
  try {
    s = await (await fetch("/api/session", { credentials: "same-origin" })).json();
  } catch (e) {
    $("conn").textContent = "node not answering";
    $("conn").className = "conn down";
    setTimeout(start, 2000);
    return;
  }
  if (s.auth_required && !s.authenticated) { showLogin(); return; }
  $("logout").hidden = !s.auth_required;
  showApp();
}
function showLogin() {
  if (S.es) { S.es.close(); S.es = null; }
  S.status = S.traffic = S.money = null;
  $("app").hidden = true;
  $("node-line").textContent = "";
  $("conn").textContent = "locked";
  $("conn").className = "conn";
  $("login").hidden = false;
  $("token").focus();
}
async function login(ev) {
  ev.preventDefault();
  const token = $("token").value;
  const r = await fetch("/api/login", { method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json" }, body: JSON.stringify({ token }) });
  if (!r.ok) {
    const j = await r.json().catch(() => ({}));
    $("login-error").textContent = j.error || `login failed (${r.status})`;
    return;
  }
  $("token").value = "";
  $("login-error").textContent = "";
  $("login").hidden = true;
  $("logout").hidden = false;
  showApp();
}
async function logout() {
  await fetch("/api/logout", { method: "POST", credentials: "same-origin" });
  showLogin();
}
function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  connect();
  loadModels();
  refreshConsole();
}
async function refreshConsole() {   // the first figures at once; the stream's "console" events keep them current
  try {
    const [t, m] = await Promise.all([api("/api/traffic"), api("/api/money")]);
    if (t.ok) S.traffic = await t.json();
    if (m.ok) S.money = await m.json();
    renderTraffic();
    renderMoney();
  } catch (e) { /* shown by the stream state */ }
}

// ---------------------------------------------------------------- live stream

function connect() {
  if (S.es) S.es.close();
  const es = new EventSource("/api/events");
  S.es = es;
  es.addEventListener("open", () => { $("conn").textContent = "live"; $("conn").className = "conn live"; });
  es.addEventListener("error", async () => {
    $("conn").textContent = "reconnecting…";
    $("conn").className = "conn down";
    try {
      const s = await (await fetch("/api/session", { credentials: "same-origin" })).json();
      if (s.auth_required && !s.authenticated) showLogin();
    } catch (e) { /* the node is away: EventSource retries by itself */ }
  });
  es.addEventListener("snapshot", (e) => {
    const st = JSON.parse(e.data).status;
    setStatus(st);
    const n = (st && Array.isArray(st.peers)) ? st.peers.filter((p) => p.state === "alive").length : 0;
    logEvent(`console connected: ${n} peer${n === 1 ? "" : "s"} alive`, "snapshot", JSON.parse(e.data).ts);
  });
  es.addEventListener("console", (e) => {
    const d = JSON.parse(e.data);
    S.traffic = d.traffic || null;
    S.money = d.money || null;
    renderTraffic();
    renderMoney();
  });
  const words = { peer_up: "joined", peer_learned: "learned of", peer_suspect: "is suspect", peer_down: "is down",
    peer_left: "left", peer_pruned: "forgotten", mesh_switched: "mesh switched", started: "started", stopped: "stopped" };
  for (const kind of ["peer_up", "peer_learned", "peer_updated", "peer_suspect", "peer_down", "peer_left", "peer_pruned",
    "self_updated", "mesh_switched", "started", "stopped"]) {
    es.addEventListener(kind, (e) => {
      const d = JSON.parse(e.data);
      if (words[kind]) {
        const who = d.node_id ? `node ${short(d.node_id)}` : "this node";
        const why = d.reason ? ` (${str(d.reason, 60)})` : "";
        logEvent(`${who} ${words[kind]}${why}`, kind, d.ts);
      }
      scheduleRefetch();
    });
  }
}
function scheduleRefetch() {
  if (S.refetch) return;
  S.refetch = setTimeout(async () => {
    S.refetch = null;
    try { setStatus(await (await api("/api/status")).json()); } catch (e) { /* shown by the stream state */ }
  }, 250);
}
function logEvent(text, kind, ts) {
  S.events.unshift({ t: ts || Date.now() / 1000, text, kind });
  S.events.length = Math.min(S.events.length, MAX_EVENTS);
  const ol = $("events");
  ol.replaceChildren(...S.events.map((e) => h("li", { "data-kind": e.kind }, h("time", { text: clock(e.t) }), e.text)));
}

// ---------------------------------------------------------------- status -> views

function setStatus(st) {
  if (!st || typeof st !== "object") return;
  S.status = st;
  const now = Date.now() / 1000;
  const present = new Set((st.peers || []).map((p) => p.node_id));
  for (const p of st.peers || []) { S.known.set(p.node_id, p); S.gone.delete(p.node_id); }
  for (const [id, p] of S.known) {
    if (!present.has(id)) {
      S.known.delete(id);
      S.gone.set(id, { row: { ...p, state: "gone", connected: false, rtt_ms: null }, at: now });
    }
  }
  while (S.gone.size > MAX_GONE) S.gone.delete(S.gone.keys().next().value);
  const node = st.node || {};
  $("node-line").textContent = `node ${short(st.node_id)} · mesh ${short(st.mesh_id || "none")} · ${str(st.policy, 20)} · ${str(st.kind, 20)}`
    + (node.api_url ? ` · API ${str(node.api_url, 80)}` : "");
  renderMesh();
  renderModels();
  renderMoney();
}

function peersAll() {
  const st = S.status || {};
  return [...(st.peers || []), ...[...S.gone.values()].map((g) => g.row)];
}
function fullId(id) {   // a node id or a prefix of one (route headers and traffic rows carry 16 hex digits)
  id = String(id || "");
  const st = S.status || {};
  if (!id || id === st.node_id || (st.node_id || "").startsWith(id)) return st.node_id || id;
  for (const k of [...S.known.keys(), ...S.gone.keys()]) if (k.startsWith(id)) return k;
  return id;
}
function annOf(id) {
  const st = S.status || {};
  if (id === st.node_id) return st.self || {};
  const p = S.known.get(id) || (S.gone.get(id) || {}).row;
  return (p && p.announcement) || {};
}
function nodeName(id) {
  // the announced name (several nodes on one machine share its hostname: then with the id's start)
  id = fullId(id);
  const name = str(annOf(id).name, 40);
  if (!name) return short(id);
  const st = S.status || {};
  const same = [st.node_id, ...S.known.keys()].filter((k) => k !== id && str(annOf(k).name, 40) === name).length;
  return same ? `${name} ${id.slice(0, 8)}` : name;
}

function renderMesh() {
  const st = S.status;
  if (!st) return;
  const peers = peersAll();
  const alive = peers.filter((p) => p.state === "alive").length;
  const self = st.self || {};
  $("mesh-summary").replaceChildren(
    card("Nodes alive", `${alive + 1} of ${peers.filter((p) => p.state !== "gone").length + 1}`),
    card("Mesh", short(st.mesh_id || "none")),
    card("Policy", str(st.policy, 20) || "–"),
    card("This node", `${nodeName(st.node_id)} (${str(st.kind, 20)})`),
    card("Uptime", `${Math.round(num(st.uptime_s) || 0)} s`),
  );
  renderTopology(st, peers);
  const rows = [selfRow(st, self), ...peers.map((p) => peerRow(p))];
  table($("nodes"), [["Node"], ["State"], ["Link"], ["RTT", "num"], ["Kind"], ["Hardware"], ["Capacity", "num"], ["Models"], ["Version"]], rows);
}
function hwText(hw) {
  if (!hw) return "–";
  const parts = [str(hw.device_kind, 20) || "cpu"];
  if (hw.gpu_name) parts.push(`${str(hw.gpu_name, 60)}${hw.gpu_count > 1 ? ` ×${hw.gpu_count}` : ""}`);
  if (num(hw.cpu_cores)) parts.push(`${hw.cpu_cores} cores`);
  if (num(hw.ram_bytes)) parts.push(`${bytes(hw.ram_bytes)} RAM`);
  if (num(hw.vram_bytes)) parts.push(`${bytes(hw.vram_bytes)} VRAM`);
  return parts.join(" · ");
}
function modelsText(ann) {
  const ms_ = (ann && Array.isArray(ann.models)) ? ann.models : [];
  if (!ms_.length) return "–";
  return ms_.map((m) => `${str(m.model_id, 60)} (${str(m.role, 20)}${Array.isArray(m.layers) ? ` ${m.layers[0]}–${m.layers[1]}` : ""})`).join(", ");
}
function capacity(ann) {
  const v = ann && ann.labels ? Number(ann.labels.capacity_bytes) : NaN;
  return isFinite(v) && v > 0 ? bytes(v) : "–";
}
function selfRow(st, ann) {
  return h("tr", { "data-node-id": st.node_id, "data-state": "self" },
    td(h("span", {}, h("span", { class: `dot ${colorOf(st.node_id)}`, "aria-hidden": "true" }), nodeName(st.node_id), " (this node)")),
    td(stateSpan("alive")), td("–"), td("–", "num"), td(str(ann.kind, 20) || str(st.kind, 20)),
    td(hwText(ann.hardware)), td(capacity(ann), "num"), td(modelsText(ann)), td(str(ann.version, 30) || "–"));
}
function peerRow(p) {
  const ann = p.announcement || {};
  const link = p.connected ? (p.path || "connected")
    : (["down", "left", "gone"].includes(p.state) ? "–" : (p.via ? `via ${nodeName(p.via)}` : "not connected"));
  return h("tr", { "data-node-id": p.node_id, "data-state": str(p.state, 20) },
    td(h("span", { title: p.node_id }, h("span", { class: `dot ${colorOf(p.node_id)}`, "aria-hidden": "true" }), nodeName(p.node_id))),
    td(stateSpan(p.state)), td(stateSpan(link)), td(ms(p.rtt_ms), "num"), td(str(ann.kind, 20) || "–"),
    td(hwText(ann.hardware)), td(capacity(ann), "num"), td(modelsText(ann)), td(str(ann.version, 30) || "–"));
}

function renderTopology(st, peers) {
  const nodes = [{ id: st.node_id, state: "self", self: true }, ...peers.map((p) => ({ id: p.node_id, state: p.state, p }))];
  // drawn at the width it is shown (labels keep their size on a phone)
  const W = Math.max(300, Math.min(640, $("topology").clientWidth || 640));
  const H = Math.max(W < 500 ? 300 : 320, Math.min(460, 200 + nodes.length * 30));
  const cx = W / 2, cy = H / 2 - 10, R = Math.min(W, H) / 2 - 60;
  const pos = new Map();
  nodes.forEach((n, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / nodes.length;
    pos.set(n.id, nodes.length === 1 ? [cx, cy] : [cx + R * Math.cos(a), cy + R * Math.sin(a)]);
  });
  const links = [];
  const seen = new Set();
  const addLink = (a, b, rtt, cls) => {
    const key = [a, b].sort().join("|");
    if (seen.has(key) || !pos.has(a) || !pos.has(b) || a === b) return;
    seen.add(key);
    links.push({ a, b, rtt, cls });
  };
  for (const p of peers) {   // this node's own links: measured here
    if (p.state === "gone" || p.state === "left" || p.state === "down") continue;
    addLink(st.node_id, p.node_id, p.rtt_ms, p.connected ? (p.path === "relay" ? "relay" : "") : "indirect");
  }
  for (const p of peers) {   // links between peers: as each peer announces them
    if (p.state !== "alive" || !p.announcement || typeof p.announcement.rtts !== "object") continue;
    for (const [other, rtt] of Object.entries(p.announcement.rtts)) {
      const q = S.known.get(other);
      if (other !== st.node_id && q && q.state === "alive") addLink(p.node_id, other, rtt, "");
    }
  }
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "topo-caption topo-desc" });
  const desc = `${nodes.length} nodes, ${links.length} links. ` + links.map((l) => `${nodeName(l.a)} to ${nodeName(l.b)}: ${ms(l.rtt)}${l.cls ? ` (${l.cls})` : ""}`).join("; ");
  g.append(svg("desc", { id: "topo-desc" }, desc));
  for (const l of links) {
    const [x1, y1] = pos.get(l.a), [x2, y2] = pos.get(l.b);
    g.append(svg("line", { x1, y1, x2, y2, class: `link ${l.cls}` }));
    const label = num(l.rtt) === null ? (l.cls || "") : `${ms(l.rtt)}${l.cls === "relay" ? " relay" : ""}`;
    if (label) g.append(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, class: "rtt", "text-anchor": "middle" }, label));
  }
  for (const n of nodes) {
    const [x, y] = pos.get(n.id);
    const color = getComputedStyle(document.documentElement).getPropertyValue("--accent");
    const grp = svg("g", { class: `node ${n.self ? "self" : ""} ${n.state}`, "data-node-id": n.id, "data-state": n.state });
    const circle = svg("circle", { cx: x, cy: y, r: 18, class: colorOf(n.id) });
    circle.style.fill = n.self || n.state === "alive" ? paletteColor(n.id) : null;
    if (n.self) circle.style.stroke = color;
    grp.append(circle);
    const ann = n.self ? (S.status.self || {}) : (n.p && n.p.announcement) || {};
    grp.append(svg("text", { x, y: y + 36, "text-anchor": "middle" }, `${nodeName(n.id)}${n.self ? " (here)" : ""}`));
    grp.append(svg("text", { x, y: y + 52, "text-anchor": "middle", class: "muted" }, `${str(ann.kind, 12) || ""} ${n.self ? "" : str(n.state, 12)}`.trim()));
    g.append(grp);
  }
  $("topology").replaceChildren(g);
}
const PALETTE = ["#0b5cad", "#8a4100", "#1d6b32", "#6f2d86", "#a3162b", "#00616b", "#4a4a9c", "#5c5c12"];
function paletteColor(id) { return PALETTE[Number(colorOf(id).slice(1))]; }

// ---------------------------------------------------------------- models

function plansFrom(ann, fromNode) {
  const out = [];
  const labels = (ann && ann.labels) || {};
  for (const [k, v] of Object.entries(labels)) {
    if (!k.startsWith("plan:")) continue;
    let d;
    try { d = JSON.parse(v); } catch (e) { continue; }
    if (!d || typeof d !== "object" || !Array.isArray(d.stages)) continue;
    out.push({ key: k.slice(5), d, from: fromNode });
  }
  return out;
}
function renderModels() {
  const st = S.status;
  if (!st) return;
  const box = $("models");
  // every plan announced in the mesh (one per host: replicas of a model are several plans)
  const plans = [...plansFrom(st.self, st.node_id)];
  for (const p of st.peers || []) if (p.state === "alive") plans.push(...plansFrom(p.announcement, p.node_id));
  const byModel = new Map();
  const roles = new Map();   // model -> [{node, role, ready, layers}]
  const note = (node, ann) => {
    for (const m of (ann && Array.isArray(ann.models) ? ann.models : [])) {
      const id = str(m.model_id, 120);
      if (!roles.has(id)) roles.set(id, []);
      roles.get(id).push({ node, role: str(m.role, 20), ready: !!m.ready, m });
    }
  };
  note(st.node_id, st.self);
  for (const p of st.peers || []) if (p.state === "alive") note(p.node_id, p.announcement);
  for (const pl of plans) {
    const id = pl.key.split("@")[0];
    if (!byModel.has(id)) byModel.set(id, []);
    byModel.get(id).push(pl);
  }
  for (const id of roles.keys()) if (!byModel.has(id)) byModel.set(id, []);
  box.replaceChildren();
  if (!byModel.size) {
    box.append(h("p", { class: "empty", text: "No model in the mesh yet (nodes started with --no-model serve none)." }));
    return;
  }
  const demand = st.demand || {};
  for (const [id, pls] of [...byModel.entries()].sort()) {
    const ready = pls.filter((p) => p.d.ready);
    const rs = roles.get(id) || [];
    const first = (rs[0] && rs[0].m) || {};
    const dm = demand[id] || {};
    const sec = h("section", { class: "panel model", "data-model": id, "aria-label": `Model ${id}` });
    sec.append(h("div", { class: "model-head" },
      h("h3", { text: id }),
      h("span", { class: "badge" }, stateSpan(ready.length ? "ready" : "waiting")),
      h("span", { class: "badge", text: `${ready.length} ready replica${ready.length === 1 ? "" : "s"}` }),
      num(first.n_layers) ? h("span", { class: "badge", text: `${first.n_layers} layers` }) : null,
      num(first.size_bytes) ? h("span", { class: "badge", text: bytes(first.size_bytes) }) : null,
      first.quant ? h("span", { class: "badge", text: str(first.quant, 20) }) : null,
      h("span", { class: "badge", text: `demand: ${num(dm.requests) || 0} requests from ${num(dm.nodes) || 0} nodes` })));
    for (const pl of pls) sec.append(planView(pl, first));
    const standbys = new Set();
    for (const pl of pls) for (const s of Array.isArray(pl.d.standbys) ? pl.d.standbys : []) standbys.add(String(s));
    for (const r of rs) if (r.role === "standby") standbys.add(r.node);
    sec.append(h("p", {}, h("strong", { text: "Standby nodes: " }),
      standbys.size ? [...standbys].map(nodeName).join(", ") : "none"));
    sec.append(h("p", {}, h("strong", { text: "Held by: " }),
      rs.length ? rs.map((r) => `${nodeName(r.node)} (${r.role}${r.ready ? ", ready" : ""})`).join(", ") : "–"));
    box.append(sec);
  }
}
function planView(pl, meta) {
  const d = pl.d;
  const n = num(meta.n_layers) || Math.max(1, ...d.stages.map((s) => num(s[2]) || 0));
  const experts = d.kind === "experts";
  const wrap = h("div", { class: "plan", "data-host": str(d.host, 64), "data-epoch": num(d.epoch) || 0 });
  wrap.append(h("h4", {}, `${experts ? "Expert split" : (d.stages.length > 1 ? `Pipeline, ${d.stages.length} stages` : "Solo")} · host ${nodeName(str(d.host, 64))} · plan epoch ${num(d.epoch) ?? "–"}`,
    d.ready ? "" : ` · waiting: ${str(d.waiting, 200) || "for capacity"}`,
    num(d.est_token_latency_ms) ? ` · est. ${ms(d.est_token_latency_ms)}/token` : ""));
  const bar = h("div", { class: "bar", role: "img" });
  const said = [];
  const rows = [];
  d.stages.forEach((s, i) => {
    if (!Array.isArray(s) || s.length < 4) return;
    const node = str(s[0], 64), a = num(s[1]), b = num(s[2]), tb = num(s[3]);
    const nExp = experts && d.experts && d.experts[node] ? Object.values(d.experts[node]).reduce((x, l) => x + (Array.isArray(l) ? l.length : 0), 0) : 0;
    const what = experts ? (a === 0 ? `trunk + ${nExp} experts` : `${nExp} experts`) : `layers ${a}–${b}`;
    const seg = h("div", { class: `seg ${colorOf(node)}`, "data-node-id": node, title: `${nodeName(node)}: ${what}, ${bytes(tb)}` },
      `${nodeName(node)} · ${what} · ${bytes(tb)}`);
    seg.style.flex = experts ? `${Math.max(1, nExp + (a === 0 ? 4 : 0))} 1 0` : `${Math.max(1, (b ?? 0) - (a ?? 0))} 1 0`;
    bar.append(seg);
    said.push(`stage ${i + 1} on ${nodeName(node)}: ${what}, ${bytes(tb)}`);
    rows.push(h("tr", { "data-node-id": node }, td(String(i + 1), "num"), td(nodeName(node)), td(what), td(bytes(tb), "num")));
  });
  bar.setAttribute("aria-label", said.join("; ") || "no stages");
  if (d.stages.length) wrap.append(bar);
  const t = h("table", { class: "stages" });
  table(t, [["Stage", "num"], ["Node"], ["Holds"], ["Tensor bytes", "num"]], rows, "No stage assigned.");
  wrap.append(h("div", { class: "scroll", role: "region", tabindex: "0", "aria-label": `Stages of ${pl.key.split("@")[0]} hosted by ${nodeName(str(d.host, 64))}` }, t));
  if (num(d.activation_bytes_sent)) wrap.append(h("p", { class: "muted", text: `activations sent: ${bytes(d.activation_bytes_sent)} · failovers: ${num(d.failovers) || 0}` }));
  return wrap;
}

// ---------------------------------------------------------------- traffic

function renderTraffic() {
  const t = S.traffic;
  if (!t) return;
  const models = Array.isArray(t.models) ? t.models : [];
  const sum = (k) => models.reduce((x, m) => x + (num(m[k]) || 0), 0);
  const ttfts = models.map((m) => num(m.ttft_p50_ms)).filter((x) => x !== null);
  $("traffic-summary").replaceChildren(
    card("Requests/s (1 min)", fixed(sum("rps"), 2)),
    card("Tokens/s (1 min)", fixed(sum("tok_s"), 1)),
    card("TTFT p50", ttfts.length ? ms(Math.max(...ttfts)) : "–"),
    card("Queue depth", String(num(t.queue_depth) || 0)),
    card("Requests served", String(sum("requests"))),
  );
  table($("traffic-models"), [["Model"], ["Requests", "num"], ["Errors", "num"], ["Req/s", "num"], ["Tok/s", "num"], ["TTFT p50", "num"], ["TTFT p95", "num"], ["In flight", "num"]],
    models.map((m) => h("tr", { "data-model": str(m.model, 120) }, td(str(m.model, 120)), td(m.requests, "num"), td(m.errors, "num"), td(fixed(m.rps, 2), "num"),
      td(fixed(m.tok_s, 1), "num"), td(ms(m.ttft_p50_ms), "num"), td(ms(m.ttft_p95_ms), "num"), td(m.in_flight, "num"))),
    "No request served yet.");
  const rows = Array.isArray(t.rows) ? t.rows : [];
  const selfId = S.status ? S.status.node_id : "";
  const served = (n) => (n === "self" ? `${nodeName(selfId)} (here)` : nodeName(String(n)));
  table($("traffic-rows"), [["Model"], ["Served by"], ["Requests", "num"], ["Req/s", "num"], ["Tok/s", "num"], ["Tokens", "num"], ["TTFT p50", "num"]],
    rows.map((r) => h("tr", {}, td(str(r.model, 120)), td(served(r.node)), td(r.requests, "num"), td(fixed(r.rps, 2), "num"),
      td(fixed(r.tok_s, 1), "num"), td(r.tokens, "num"), td(ms(r.ttft_p50_ms), "num"))),
    "No request served yet.");
  $("show-prompts").checked = !!t.show_prompts;
  const recent = Array.isArray(t.recent) ? t.recent : [];
  const head = [["Time"], ["Model"], ["Served by"], ["From"], ["Status", "num"], ["Tokens in/out", "num"], ["TTFT", "num"], ["Total", "num"]];
  if (t.show_prompts) head.push(["Prompt"]);
  table($("traffic-recent"), head, recent.map((r) => {
    const tr = h("tr", { "data-request-id": str(r.request_id, 64) }, td(clock(r.ts)), td(str(r.model, 120) || str(r.requested, 120) || "–"), td(served(r.node)),
      td(r.entry === "client" ? "client" : `node ${short(r.entry)}`), td(stateSpan(String(r.status)), "num"),
      td(`${r.prompt_tokens ?? "–"} / ${r.completion_tokens ?? "–"}`, "num"), td(ms(r.ttft_ms), "num"), td(ms(r.total_ms), "num"));
    if (t.show_prompts) tr.append(td(str(r.prompt, 300) || "–"));
    return tr;
  }), "No request yet.");
}

// ---------------------------------------------------------------- money

function amount(v, m) {
  const a = m && m.asset;
  if (num(v) === null) return "–";
  if (!a) return String(v);
  const d = num(a.decimals) ?? 6;
  return `${(v / 10 ** d).toFixed(Math.min(d, 6))} ${str(a.symbol, 12)}`;
}
function txLink(tx, m) {
  if (!tx) return "–";
  const hash = str(tx, 80);
  const text = hash.length > 20 ? `${hash.slice(0, 10)}…${hash.slice(-8)}` : hash;
  const base = m && typeof m.explorer === "string" && /^https:\/\//.test(m.explorer) ? m.explorer : "";
  if (base && /^0x[0-9a-fA-F]{64}$/.test(hash)) return h("a", { href: `${base}/tx/${hash}`, class: "mono", title: hash, rel: "noreferrer noopener", target: "_blank" }, text);
  return h("span", { class: "mono", title: hash }, text);
}
function section(title, ...kids) { return h("div", { class: "panel" }, h("h3", { text: title }), ...kids); }
function tableOf(head, rows, empty, label) {
  const t = h("table");
  table(t, head, rows, empty);
  return h("div", { class: "scroll", role: "region", tabindex: "0", "aria-label": label }, t);
}
function renderMoney() {
  const m = S.money;
  if (!m) return;
  const econ = ((S.status || {}).node || {}).economics || {};
  const L = m.ledger || {};
  const offer = m.offer;
  const price = !m.charges ? "free" : [offer && offer.per_request ? `${amount(offer.per_request, m)} per request` : null,
    offer && offer.per_1k_tokens ? `${amount(offer.per_1k_tokens, m)} per 1k tokens` : null].filter(Boolean).join(" + ");
  $("money-summary").replaceChildren(
    card("Selling", `${price || "–"}`),
    card("Mode", str(m.mode, 20)),
    card("Revenue settled", m.ledger ? amount(L.revenue, m) : "–"),
    card("Settled payments", m.ledger ? String(L.settled_payments) : "–"),
    card("Credit outstanding", m.ledger ? amount(L.credit_outstanding, m) : "–"),
    card("Failed settlements", m.ledger ? String(L.failed_settlements) : "–"),
  );
  const box = $("money");
  box.replaceChildren();
  if (m.asset) box.append(h("p", { class: "muted" }, `Paid in ${str(m.asset.symbol, 12)} on ${str(m.asset.network, 40)} to `,
    h("span", { class: "mono", text: str(offer && offer.pay_to, 64) || "–" }), m.explorer ? "" : " (local chain: no public explorer)"));
  box.append(section("Settlements",
    tableOf([["Updated"], ["Payer"], ["Amount", "num"], ["Kind"], ["State"], ["Transaction"]],
      (m.settlements || []).map((p) => h("tr", {}, td(clock(p.updated)), td(h("span", { class: "mono", text: str(p.payer, 64) })),
        td(amount(p.amount, m), "num"), td(str(p.kind, 20)), td(stateSpan(str(p.state, 20))), td(txLink(p.tx, m)))),
      m.charges ? "No payment yet." : "This node is free: it takes no payments.", "Settlements")));
  box.append(section("Credit accounts",
    tableOf([["Payer"], ["Balance", "num"], ["Held for requests", "num"]],
      (m.accounts || []).map((a) => h("tr", {}, td(h("span", { class: "mono", text: str(a.payer, 64) })), td(amount(a.balance, m), "num"), td(amount(a.held, m), "num"))),
      "No prepaid credit.", "Credit accounts")));
  box.append(section("Work receipts per epoch",
    tableOf([["Epoch", "num"], ["Requests", "num"], ["Receipts", "num"], ["Work units", "num"]],
      (m.epochs || []).map((e) => h("tr", {}, td(e.epoch, "num"), td(e.requests, "num"), td(e.receipts, "num"), td(e.units, "num"))),
      "No receipts: this node is not a paid entry node, or none was served yet.", "Receipts per epoch")));
  box.append(section("Payouts",
    tableOf([["Epoch", "num"], ["Node"], ["Work units", "num"], ["Amount", "num"], ["Paid to"], ["Transaction"]],
      (m.payouts || []).map((p) => h("tr", {}, td(p.epoch, "num"), td(nodeName(str(p.node_id, 64))), td(p.units, "num"), td(amount(p.amount, m), "num"),
        td(p.paid ? h("span", { class: "mono", text: str(p.account, 64) }) : stateSpan("withheld")), td(txLink(p.tx, m)))),
      "No epoch paid out yet.", "Payouts")));
  box.append(section("Spot checks",
    tableOf([["Epoch", "num"], ["Node"], ["Checks", "num"], ["Verdict"], ["Failed", "num"], ["Request hash"]],
      (m.spot_checks || []).map((c) => h("tr", {}, td(c.epoch, "num"), td(nodeName(str(c.node_id, 64))), td(c.checks, "num"),
        td(c.score === null ? stateSpan("waiting") : stateSpan(c.failed ? "failed" : "ok")), td(c.failed ?? "–", "num"), td(txLink(c.request_hash, null)))),
      "No spot check recorded.", "Spot checks")));
  const later = (title, v, what) => section(title, Array.isArray(v) && v.length
    ? tableOf(Object.keys(v[0]).map((k) => [k]), v.map((row) => h("tr", {}, Object.keys(v[0]).map((k) => td(str(String(row[k] ?? "–"), 120))))), "", title)
    : (v && typeof v === "object" && !Array.isArray(v)
      ? h("dl", {}, Object.entries(v).flatMap(([k, x]) => [h("dt", { text: k }), h("dd", { text: str(String(x), 120) })]))
      : h("p", { class: "empty", text: v === null || v === undefined ? `Not reported by this node: ${what}` : "None." })));
  box.append(later("Escrow vouchers", econ.vouchers, "escrow vouchers arrive with the escrow contracts."));
  box.append(later("Stake", econ.stake, "staking is not wired into the node yet."));
  box.append(later("Slashes", econ.slashes, "slashing is not wired into the node yet."));
}

// ---------------------------------------------------------------- invites

async function mint(ev) {
  ev.preventDefault();
  $("invite-error").textContent = "";
  const r = await postJSON("/api/invite", { expires: $("invite-expires").value, single_use: $("invite-single").checked });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) { $("invite-error").textContent = j.error || `failed (${r.status})`; return; }
  S.minted.unshift({ token: j.token, expires_at: j.expires_at, single_use: j.single_use, revoked: false });
  renderInvites();
}
function renderInvites() {
  $("invites").replaceChildren(...S.minted.map((m, i) => h("li", {},
    h("code", { class: "tok", text: m.token }),
    h("span", { class: "muted", text: `${m.single_use ? "single use, " : ""}expires ${new Date(m.expires_at * 1000).toLocaleString()}` }),
    h("button", { type: "button", class: "quiet", "aria-label": `Copy invite ${i + 1}`, onclick: () => navigator.clipboard && navigator.clipboard.writeText(m.token) }, "Copy"),
    m.revoked ? stateSpan("revoked") : h("button", { type: "button", class: "danger", "aria-label": `Revoke invite ${i + 1}`, onclick: () => revoke(m.token) }, "Revoke"))));
}
async function revoke(token) {
  const r = await postJSON("/api/invite/revoke", { token });
  const j = await r.json().catch(() => ({}));
  $("revoke-result").textContent = r.ok ? "Revoked: nodes of this mesh refuse the token from now on (members it admitted stay)." : (j.error || `failed (${r.status})`);
  if (r.ok) for (const m of S.minted) if (m.token === token) m.revoked = true;
  renderInvites();
}

// ---------------------------------------------------------------- playground

let chatAbort = null;
const transcript = [];
async function loadModels() {
  try {
    const j = await (await api("/api/playground/models")).json();
    const sel = $("chat-model");
    const keep = sel.value;
    sel.replaceChildren(h("option", { value: "auto", text: "auto (the mesh picks)" }),
      ...(Array.isArray(j.data) ? j.data : []).map((m) => h("option", { value: str(m.id, 128), text: `${str(m.id, 128)}${m.state && m.state !== "ready" ? ` (${str(m.state, 20)})` : ""}` })));
    sel.value = keep || "auto";
    if (!sel.value) sel.value = "auto";
  } catch (e) { /* the playground still works with auto */ }
}
function chatItem(role, text) {
  const li = h("li", { class: role }, h("span", { class: "who", text: role === "user" ? "You" : "Assistant" }), h("span", { class: "text", text }));
  $("chat-log").append(li);
  return li;
}
async function send(ev) {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chatAbort) return;
  $("chat-input").value = "";
  transcript.push({ role: "user", content: text });
  chatItem("user", text);
  const li = chatItem("assistant", "");
  const out = li.querySelector(".text");
  li.setAttribute("aria-busy", "true");
  $("chat-route").textContent = "";
  chatAbort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  let answer = "";
  try {
    const r = await fetch("/api/playground/chat", { method: "POST", credentials: "same-origin", signal: chatAbort.signal,
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: $("chat-model").value, messages: transcript, max_tokens: Number($("chat-max").value) || 128 }) });
    const route = r.headers.get("x-mesh402-route");
    $("chat-route").textContent = route ? `x-mesh402-route: ${route}` : "";
    if (r.status === 401) { showLogin(); return; }
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      const msg = (j.error && (j.error.message || j.error)) || `HTTP ${r.status}`;
      out.textContent = `Error ${r.status}: ${typeof msg === "string" ? msg : JSON.stringify(msg)}`;
      li.classList.add("failed");
      transcript.pop();
      return;
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", usage = null, model = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const evt = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of evt.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          let j;
          try { j = JSON.parse(data); } catch (e) { continue; }
          if (j.error) { answer += `\n[error: ${str(j.error.message || "", 300)}]`; }
          if (j.model) model = str(j.model, 128);
          const c = j.choices && j.choices[0];
          const piece = c && c.delta && typeof c.delta.content === "string" ? c.delta.content : "";
          if (piece) answer += piece;
          if (j.usage) usage = j.usage;
        }
        out.textContent = answer;
      }
    }
    transcript.push({ role: "assistant", content: answer });
    li.append(h("span", { class: "meta", text: `${model}${usage ? ` · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : ""}` }));
  } catch (e) {
    if (e.name !== "AbortError") out.textContent = `${answer}\n[failed: ${e.message}]`;
    if (answer) transcript.push({ role: "assistant", content: answer }); else transcript.pop();
  } finally {
    li.removeAttribute("aria-busy");
    li.dataset.done = "true";
    chatAbort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

// ---------------------------------------------------------------- tabs (WAI-ARIA tabs pattern)

function selectTab(tab, focus) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.id.slice(4)}`);
  if (tab.id === "tab-playground") loadModels();
}
function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const t of tabs) {
    t.addEventListener("click", () => selectTab(t, false));
    t.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(t);
      const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (to === undefined) return;
      e.preventDefault();
      selectTab(tabs[(to + tabs.length) % tabs.length], true);
    });
  }
  const want = $(`tab-${location.hash.slice(1)}`);
  if (want) selectTab(want, false);
}

document.addEventListener("DOMContentLoaded", () => {
  setupTabs();
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("invite-form").addEventListener("submit", mint);
  $("revoke-form").addEventListener("submit", (e) => { e.preventDefault(); const v = $("revoke-token").value.trim(); if (v) revoke(v); });
  $("chat-form").addEventListener("submit", send);
  $("chat-stop").addEventListener("click", () => chatAbort && chatAbort.abort());
  $("chat-clear").addEventListener("click", () => { transcript.length = 0; $("chat-log").replaceChildren(); $("chat-route").textContent = ""; });
  $("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("chat-form").requestSubmit(); });
  $("show-prompts").addEventListener("change", async (e) => {
    const r = await postJSON("/api/traffic/prompts", { show: e.target.checked });
    if (r.ok && S.traffic) { S.traffic.show_prompts = (await r.json()).show_prompts; renderTraffic(); }
  });
  start();
});
