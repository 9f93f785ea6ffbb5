// The live page: polls /api/state every second and draws it; served by the agent, nothing
// loaded from elsewhere. Rates are differences of the exact per-rule counters between polls.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
let previous = null;  // the last state, for rates
let drawnShape = "";  // the overlays and edges the graph was drawn for

function element(tag, attributes = {}, text = "", namespace = null) {
  const made = namespace ? document.createElementNS(namespace, tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  if (text !== "") made.textContent = text;
  return made;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function perSecond(value) {
  return value >= 10 ? value.toFixed(0) : value.toFixed(1);
}

// Rule name -> packets a second since the previous poll.
function rates(state) {
  const found = new Map();
  if (!previous) return found;
  const seconds = state.time - previous.time;
  const before = new Map(previous.counters.map((c) => [c.identity || c.rule, c.packets]));
  for (const c of state.counters) {
    const was = before.get(c.identity || c.rule);
    if (seconds > 0 && was !== undefined && c.packets >= was) found.set(c.rule, (c.packets - was) / seconds);
  }
  return found;
}

function showHeader(state) {
  const p = state.policy;
  document.getElementById("netns").textContent = p.netns ? `namespace ${p.netns}` : "";
  const list = document.getElementById("policy");
  list.replaceChildren();
  const facts = state.loaded ? [["backend", p.backend], ["digest", (p.digest || "").slice(0, 12)],
    ["generation", p.generation], ["loaded", p.loaded_at], ["policy", p.policy]] : [["policy", "nothing loaded"]];
  if (state.cluster_version !== null) facts.push(["cluster version", state.cluster_version]);
  for (const [name, value] of facts) {
    const pair = element("div", { "data-fact": name });
    pair.append(element("dt", {}, name), element("dd", {}, String(value)));
    list.append(pair);
  }
  const health = document.getElementById("health");
  const h = state.health;
  health.textContent = h.ok ? "healthy" : (h.last_apply_ok ? "attention" : "last apply failed");
  health.className = `badge ${h.ok ? "ok" : "bad"}`;
  health.title = h.last_error || h.attachments.map((a) => `${a.ifname} ${a.mode} ${a.state}`).join(", ");
  const problems = document.getElementById("problems");
  problems.hidden = h.problems.length === 0;
  problems.textContent = h.problems.join("; ");
  document.getElementById("audit").hidden = !state.audit;
}

function drawGraph(state) {
  const svg = document.getElementById("graph");
  const shape = JSON.stringify([state.overlays, state.edges.map((e) => [e.rule, e.from, e.to, e.label])]);
  if (shape === drawnShape) return;
  drawnShape = shape;
  svg.replaceChildren();
  const width = svg.clientWidth || 700;
  const height = svg.clientHeight || 460;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const defs = element("defs", {}, "", SVG);
  const marker = element("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
    markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, "", SVG);
  marker.append(element("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#2f7d4f" }, "", SVG));
  defs.append(marker);
  svg.append(defs);

  const radius = 44;
  const ring = Math.max(0, Math.min(width, height) / 2 - radius - 30);
  const where = new Map();
  state.overlays.forEach((o, n) => {
    const angle = (2 * Math.PI * n) / state.overlays.length - Math.PI / 2;
    const single = state.overlays.length === 1;
    where.set(o.name, { x: width / 2 + (single ? 0 : ring * Math.cos(angle)),
      y: height / 2 + (single ? 0 : ring * Math.sin(angle)) });
  });

  const edges = element("g", { class: "edges" }, "", SVG);
  const seen = new Map();  // how many edges each pair has had: each next one bends further
  for (const e of state.edges) {
    const a = where.get(e.from);
    const b = where.get(e.to);
    if (!a || !b) continue;
    const pair = [e.from, e.to].join(">");
    const nth = seen.get(pair) || 0;
    seen.set(pair, nth + 1);
    const group = element("g", { class: `edge ${e.kind}`, "data-rule": e.rule }, "", SVG);
    let path;
    let label;
    if (e.from === e.to) {  // CIDRs inside one overlay: a loop above it
      const lift = radius + 28 + 18 * nth;
      path = `M ${a.x - 14} ${a.y - radius} C ${a.x - 50} ${a.y - lift - 30}, ${a.x + 50} ${a.y - lift - 30}, ${a.x + 14} ${a.y - radius}`;
      label = { x: a.x, y: a.y - lift - 12 };
    } else {
      const dx = b.x - a.x;
      const dy = b.y - a.y;
      const length = Math.hypot(dx, dy) || 1;
      const [ux, uy] = [dx / length, dy / length];
      const bend = 26 + 26 * nth;  // to the right of the direction: the way back bends apart
      const control = { x: (a.x + b.x) / 2 - uy * bend * 2, y: (a.y + b.y) / 2 + ux * bend * 2 };
      const start = { x: a.x + ux * radius - uy * 10, y: a.y + uy * radius + ux * 10 };
      const end = { x: b.x - ux * (radius + 2) - uy * 10, y: b.y - uy * (radius + 2) + ux * 10 };
      path = `M ${start.x} ${start.y} Q ${control.x} ${control.y} ${end.x} ${end.y}`;
      label = { x: (a.x + b.x) / 2 - uy * bend, y: (a.y + b.y) / 2 + ux * bend };
    }
    group.append(element("path", { d: path, "marker-end": e.kind === "allow" ? "url(#arrow)" : "" }, "", SVG));
    const text = element("text", { x: label.x, y: label.y }, "", SVG);
    text.append(element("tspan", { class: "ports" }, e.label || "any", SVG));
    text.append(element("tspan", { class: "rate", dx: "6" }, "", SVG));
    group.append(text);
    edges.append(group);
  }
  svg.append(edges);

  for (const o of state.overlays) {
    const at = where.get(o.name);
    const node = element("g", { class: `overlay${o.isolated ? " isolated" : ""}`, "data-overlay": o.name,
      transform: `translate(${at.x} ${at.y})` }, "", SVG);
    node.append(element("circle", { r: radius }, "", SVG));
    node.append(element("text", { class: "name", y: "-4" }, o.name, SVG));
    node.append(element("text", { class: "detail", y: "12" }, o.networks.slice(0, 2).join(" "), SVG));
    node.append(element("text", { class: "detail hairpin", y: "26" }, o.isolated ? "isolated" : "", SVG));
    svg.append(node);
  }
}

function updateGraph(state, perRule) {
  for (const group of document.querySelectorAll("#graph g.edge")) {
    const rate = perRule.get(group.dataset.rule);
    group.querySelector(".rate").textContent = rate === undefined ? "" : `${perSecond(rate)}/s`;
    group.classList.toggle("busy", (rate || 0) > 0);
  }
  for (const node of document.querySelectorAll("#graph g.overlay")) {
    if (node.classList.contains("isolated")) continue;
    const rate = perRule.get(`hairpin:${node.dataset.overlay}`);
    node.querySelector(".hairpin").textContent = rate ? `within: ${perSecond(rate)}/s` : "";
  }
}

function row(cells, attributes = {}) {
  const tr = element("tr", attributes);
  for (const [text, cls] of cells) {
    const td = element("td", cls ? { class: cls } : {});
    if (text instanceof Node) td.append(text); else td.textContent = String(text);
    tr.append(td);
  }
  return tr;
}

function verdictCell(action, audit) {
  const span = element("span", {}, action);
  if (audit) span.append(element("span", { class: "mark-audit" }, "audit"));
  return span;
}

function showDenials(state) {
  const body = document.querySelector("#denials tbody");
  body.replaceChildren(...state.denials.map((d) => row([
    [d.src_overlay], [d.dst_overlay], [verdictCell(d.service, d.audit)], [d.packets, "number"],
    [d.flows, "number"], [clock(d.last)]],
  { "data-denial": `${d.src_overlay}->${d.dst_overlay} ${d.service}` })));
  if (state.denials.length === 0) body.append(row([["none seen"]]));
  const flows = document.querySelector("#denied-flows tbody");
  flows.replaceChildren(...state.denied_flows.map((f) => row([
    [clock(f.last)], [f.src + (f.src_overlay ? ` (${f.src_overlay})` : "")],
    [f.dst + (f.dst_overlay ? ` (${f.dst_overlay})` : "")], [f.service],
    [verdictCell(f.action, f.audit), "deny"], [f.rule], [f.packets, "number"]])));
  const log = state.flow_log;
  document.getElementById("flow-log").textContent = log.recording
    ? `Sampled from the flow log: at most ${log.rate} verdicts a second per CPU.`
    : "The agent records no flow log (--flow-rate 0): no denials to show.";
}

function showCounters(state, perRule) {
  const body = document.querySelector("#counters tbody");
  const before = new Map((previous ? previous.counters : []).map((c) => [c.rule, c.packets]));
  body.replaceChildren(...state.counters.map((c) => {
    const rate = perRule.get(c.rule);
    const moved = before.has(c.rule) && before.get(c.rule) !== c.packets;
    return row([[c.rule], [c.text], [c.packets, "number packets"], [c.bytes, "number"],
      [rate === undefined ? "" : perSecond(rate), "number"]],
    { "data-rule": c.rule, class: moved ? "moved" : "" });
  }));
}

function render(state) {
  const perRule = rates(state);
  showHeader(state);
  drawGraph(state);
  updateGraph(state, perRule);
  showDenials(state);
  showCounters(state, perRule);
  previous = state;
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  const footer = document.getElementById("updated");
  try {
    const answer = await fetch("/api/state", { cache: "no-store" });
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    const state = await answer.json();
    render(state);
    footer.textContent = `updated ${clock(state.time)}; every second`;
    footer.className = "";
  } catch (error) {
    footer.textContent = `the agent does not answer (${error.message}); trying again`;
    footer.className = "stale";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
