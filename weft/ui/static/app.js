// The Weft dashboard: plain JavaScript, no build step. Everything from the server is shown with
// textContent (never innerHTML): tap payloads and names come from the mesh, not from us.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let overview = null;
let tapSource = null;
let tapCount = 0;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fmtPct(x) { return x === null || x === undefined ? "-" : (x * 100).toFixed(1) + "%"; }
function fmtMs(x) { return x === null || x === undefined ? "-" : x.toFixed(1) + "ms"; }
function fmtExpiry(t) {
  if (!t) return "-";
  const s = t - Date.now() / 1000;
  if (s < 0) return "EXPIRED";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " days";
}

function drawTopology(topo) {
  const root = $("topology");
  root.replaceChildren();
  const defs = svg("defs");
  const marker = svg("marker", {id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7",
                                markerHeight: "7", orient: "auto-start-reverse"});
  marker.appendChild(svg("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: "#7a8494"}));
  defs.appendChild(marker);
  root.appendChild(defs);
  const perLayer = {};
  const pos = {};
  const W = 150, H = 40;
  for (const n of topo.nodes) {
    const i = (perLayer[n.layer] = (perLayer[n.layer] || 0) + 1) - 1;
    pos[n.name] = {x: 30 + n.layer * 380, y: 40 + i * 90};
  }
  const width = Math.max(600, ...Object.values(pos).map((p) => p.x + W + 30));
  const height = Math.max(200, ...Object.values(pos).map((p) => p.y + H + 30));
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  for (const e of topo.edges) {
    const a = pos[e.source], b = pos[e.destination];
    if (!a || !b) continue;
    const g = svg("g", {"class": `edge ${e.state}`, "data-edge": `${e.source}->${e.destination}`,
                        "data-state": e.state});
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    g.appendChild(svg("line", {x1, y1, x2: x2 - 2, y2}));
    const top = e.rps === null ? "no calls yet" : `${e.rps.toFixed(1)} rps · ${fmtPct(e.success_rate)} ok`;
    const bottom = e.rps === null ? "" : `p50 ${fmtMs(e.p50_ms)} · p99 ${fmtMs(e.p99_ms)}`;
    g.appendChild(svg("text", {x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 8, "text-anchor": "middle"}, top));
    g.appendChild(svg("text", {x: (x1 + x2) / 2, y: (y1 + y2) / 2 + 16, "text-anchor": "middle"}, bottom));
    root.appendChild(g);
  }
  for (const n of topo.nodes) {
    const p = pos[n.name];
    const g = svg("g", {"class": "node", "data-service": n.name, transform: `translate(${p.x},${p.y})`});
    g.appendChild(svg("rect", {width: W, height: H}));
    g.appendChild(svg("text", {x: W / 2, y: H / 2 + 5, "text-anchor": "middle"}, n.name));
    g.addEventListener("click", () => { $("tap-service").value = n.name; });
    root.appendChild(g);
  }
}

function drawServices(services) {
  const body = $("services").querySelector("tbody");
  body.replaceChildren();
  for (const s of services) {
    for (const inst of s.instances) {
      const scs = inst.sidecars.length ? inst.sidecars : [null];
      for (const sc of scs) {
        const tr = el("tr", {"data-service": s.name});
        tr.appendChild(el("td", {}, s.name));
        tr.appendChild(el("td", {}, `${inst.id} (${inst.address})`));
        tr.appendChild(el("td", {"class": `health-${inst.health}`}, inst.health));
        tr.appendChild(el("td", {}, sc ? sc.id : "-"));
        tr.appendChild(el("td", {"class": sc ? `health-${sc.health}` : ""}, sc ? sc.health : "-"));
        tr.appendChild(el("td", {}, sc ? fmtExpiry(sc.cert_expiry) : "-"));
        tr.appendChild(el("td", {}, sc && sc.policy_version ? sc.policy_version.slice(0, 16) : "-"));
        body.appendChild(tr);
      }
    }
  }
  const select = $("tap-service");
  const current = select.value;
  const names = services.filter((s) => s.meshed).map((s) => s.name);
  if (names.join(",") !== Array.from(select.options).map((o) => o.value).join(",")) {
    select.replaceChildren(...names.map((n) => el("option", {value: n}, n)));
    if (names.includes(current)) select.value = current;
  }
}

function drawIntentions(byDest) {
  const root = $("intentions");
  root.replaceChildren();
  const dests = Object.keys(byDest).sort();
  if (!dests.length) root.appendChild(el("p", {"class": "muted"}, "no intentions (default deny)"));
  for (const d of dests) {
    const box = el("div", {"class": "intention-dest", "data-destination": d});
    box.appendChild(el("h3", {}, `→ ${d}`));
    const table = el("table");
    table.appendChild(el("tr")).append(el("th", {}, "source"), el("th", {}, "action"), el("th", {}, "mode"),
                                       el("th", {}, "origin"));
    for (const r of byDest[d]) {
      const tr = el("tr", {"class": `intention ${String(r.action).startsWith("deny") ? "deny" : "allow"}`});
      tr.append(el("td", {}, r.source), el("td", {}, r.action), el("td", {}, r.mode), el("td", {}, r.origin));
      table.appendChild(tr);
    }
    box.appendChild(table);
    root.appendChild(box);
  }
}

async function refresh() {
  try {
    const r = await fetch("/api/overview", {cache: "no-store"});
    overview = await r.json();
    drawTopology(overview.topology);
    drawServices(overview.services);
    drawIntentions(overview.intentions);
    $("problems").replaceChildren(...(overview.problems || []).slice(0, 8).map((p) => el("li", {}, p)));
    const when = overview.updated ? new Date(overview.updated * 1000).toLocaleTimeString() : "never";
    $("status").textContent = `updated ${when}`;
  } catch (err) {
    $("status").textContent = `cannot reach the dashboard server: ${err}`;
  }
}

async function check(ev) {
  ev.preventDefault();
  const body = {source: $("check-source").value.trim(), destination: $("check-destination").value.trim(),
                grpc_method: $("check-grpc-method").value.trim(), http_method: $("check-http-method").value.trim(),
                path: $("check-path").value.trim()};
  const out = $("check-result");
  const r = await fetch("/api/check", {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify(body)});
  const d = await r.json();
  if (!r.ok) { out.className = "result denied"; out.textContent = d.error; return; }
  out.className = "result " + (d.Allowed ? "allowed" : "denied");
  out.textContent = `${d.Allowed ? "ALLOWED" : "DENIED"}: ${body.source} -> ${body.destination}\n` +
    `rule: ${d.RuleLabel || "-"}\nreason: ${d.Reason || "-"}\ntable: ${d.Table} (version ${d.TableVersion})`;
}

function stopTap() {
  if (tapSource) tapSource.close();
  tapSource = null;
  $("tap-start").disabled = false;
  $("tap-stop").disabled = true;
  $("tap-state").textContent = `stopped (${tapCount} calls)`;
}

function startTap(ev) {
  ev.preventDefault();
  stopTap();
  const service = $("tap-service").value;
  if (!service) return;
  const q = new URLSearchParams({service});
  if ($("tap-method").value.trim()) q.set("method", $("tap-method").value.trim());
  if ($("tap-payload").checked) q.set("payload", "1");
  $("tap-rows").replaceChildren();
  tapCount = 0;
  tapSource = new EventSource("/api/tap?" + q.toString());
  $("tap-start").disabled = true;
  $("tap-stop").disabled = false;
  $("tap-state").textContent = `tapping ${service}…`;
  tapSource.addEventListener("hello", (e) => {
    const d = JSON.parse(e.data);
    $("tap-state").textContent = `tapping ${d.service} on ${d.sidecars.length} sidecar(s)`;
  });
  tapSource.addEventListener("problem", (e) => { $("tap-state").textContent = JSON.parse(e.data); });
  tapSource.addEventListener("call", (e) => {
    const c = JSON.parse(e.data);
    if (c.method === undefined) {  // a note from a sidecar, not a call
      $("tap-state").textContent = c.dropped !== undefined ? `${c.dropped} call(s) dropped: the tap fell behind`
        : `${c.skipped} call(s) skipped above ${c.max_rps} calls/s`;
      return;
    }
    tapCount++;
    const tr = el("tr", {"class": "tap-row"});
    const bad = !(c.status === "OK" || (/^\d+$/.test(c.status) && Number(c.status) < 500));
    tr.append(el("td", {}, String(c.ts).slice(11, 23)), el("td", {}, c.direction), el("td", {}, c.source),
              el("td", {}, c.destination), el("td", {}, c.path || c.method),
              el("td", {"class": bad ? "status-bad" : ""}, c.status), el("td", {}, c.duration_ms));
    tr.addEventListener("click", () => { $("tap-detail").textContent = JSON.stringify(c, null, 2); });
    const rows = $("tap-rows");
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > 200) rows.removeChild(rows.lastChild);
  });
}

$("check-form").addEventListener("submit", check);
$("tap-form").addEventListener("submit", startTap);
$("tap-stop").addEventListener("click", stopTap);
refresh();
setInterval(refresh, 2000);
