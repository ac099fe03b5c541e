// The dashboard page: polls /api/status every 2 s, keeps its own history for the plots and
// sparklines (the supervisor keeps none), follows /api/events (server-sent events), and sends the
// operator's controls with the token typed into the header (kept in this browser's localStorage).
"use strict";
const HISTORY = 120;
const history = { cpu: [], mem: [], actions: [] };
const sparks = {};  // agent -> actions/s over the last HISTORY polls
const tokenInput = document.getElementById("token");
tokenInput.value = localStorage.getItem("aeco-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("aeco-token", tokenInput.value));

function push(list, v) { list.push(v); if (list.length > HISTORY) list.shift(); }
function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
function cell(text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }

function plot(svg, values, max) {
  const top = Math.max(max || 0, ...values, 1e-9);
  const pts = values.map((v, i) => `${(i * 300) / (HISTORY - 1)},${60 - (58 * (v || 0)) / top}`).join(" ");
  svg.innerHTML = `<polyline points="${pts}"></polyline>`;
}

function gauge(label, value, over) {
  const d = document.createElement("div");
  d.className = "gauge" + (over ? " over" : "");
  d.innerHTML = `<span></span><b></b>`;
  d.firstChild.textContent = label; d.lastChild.textContent = value;
  return d;
}

async function control(body) {
  const out = document.getElementById("control-result");
  const resp = await fetch("/api/control", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Authorization": "Bearer " + tokenInput.value },
    body: JSON.stringify(body),
  });
  const data = await resp.json();
  out.textContent = resp.ok ? "done: " + data.done : "refused: " + data.error;
  out.dataset.status = String(resp.status);
}

async function showBill(agent) {
  document.getElementById("bill-agent").textContent = agent;
  const b = await (await fetch("/api/bill/" + encodeURIComponent(agent))).json();
  const body = document.querySelector("#bill tbody"); body.replaceChildren();
  for (const [kind, l] of [...Object.entries(b.by_kind), ["total", b.total]]) {
    const tr = document.createElement("tr");
    tr.append(cell(kind), cell(l.tasks), cell(fmt(l.cpu_seconds, 3)), cell(fmt(l.memory_peak_bytes / 1048576, 1)),
      cell(l.llm_tokens), cell(fmt(l.llm_cost_usd, 4)));
    body.append(tr);
  }
}

function renderAgents(agents) {
  const body = document.querySelector("#agents tbody"); body.replaceChildren();
  for (const a of agents) {
    push(sparks[a.id] = sparks[a.id] || [], a.actions_per_s);
    const tr = document.createElement("tr");
    tr.id = "agent-" + a.id; tr.className = a.state;
    const name = cell(a.id); name.style.cursor = "pointer"; name.onclick = () => showBill(a.id);
    const spark = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    spark.setAttribute("viewBox", "0 0 300 60"); spark.setAttribute("class", "spark");
    spark.style.width = "60px"; spark.style.height = "14px"; plot(spark, sparks[a.id]);
    const acts = cell(""); acts.append(String(a.actions + a.rejected) + " ", spark);
    const ctl = document.createElement("td");
    for (const [label, kind] of [["pause", "pause"], ["resume", "resume"]]) {
      const b = document.createElement("button"); b.textContent = label; b.className = kind;
      b.onclick = () => control({ type: kind, agent: a.id }); ctl.append(b);
    }
    const grant = document.createElement("button"); grant.textContent = "+100 scrip"; grant.className = "grant";
    grant.onclick = () => control({ type: "grant", agent: a.id, asset: "scrip", amount: 100 }); ctl.append(grant);
    const burn = document.createElement("button"); burn.textContent = "-100 scrip"; burn.className = "burn";
    burn.onclick = () => control({ type: "burn", agent: a.id, asset: "scrip", amount: 100 }); ctl.append(burn);
    tr.append(name, cell(a.state, "state text"), acts, cell(fmt(a.actions_per_s, 1)), cell(fmt(100 * a.blocked_share, 0) + "%"),
      cell(`${fmt(a.cpu_bucket_s, 2)}/${fmt(a.cpu_bucket_capacity_s, 1)}`), cell(a.scrip), cell(a.tokens),
      cell(fmt(a.spent_usd, 4)), cell(fmt(a.budget_left_usd, 4)), cell(fmt(a.memory_quota_bytes / 1048576, 0)),
      cell(a.last, "text"), ctl);
    body.append(tr);
  }
}

function renderGauges(st) {
  const c = st.container, t = st.totals || {};
  const g = document.getElementById("gauges"); g.replaceChildren();
  g.append(gauge("CPU", fmt(c.cpu_percent, 0) + "% of " + c.cpu_capacity));
  const limit = c.memory_limit_bytes ? fmt(c.memory_limit_bytes / 1048576, 0) + " MB" : "no limit";
  g.append(gauge("memory", fmt((c.memory_bytes || 0) / 1048576, 0) + " MB / " + limit, c.memory_high));
  if (c.throttling) g.append(gauge("throttled periods", c.throttling.throttled + "/" + c.throttling.periods, (c.throttled_share || 0) > 0.25));
  if (c.network) g.append(gauge("network in/out", fmt(c.network.external.bytes_in / 1048576, 1) + "/" + fmt(c.network.external.bytes_out / 1048576, 1) + " MB"));
  for (const [r, p] of Object.entries(c.pressure || {})) g.append(gauge(r + " pressure", fmt(p.some_avg10, 1) + "%"));
  g.append(gauge("agents", `${t.agents} (${t.blocked} blocked)`));
  g.append(gauge("actions/s", fmt(t.actions_per_s, 1)));
  g.append(gauge("$ spent / left", fmt(t.spent_usd, 4) + " / " + fmt(t.budget_left_usd, 2)));
  push(history.cpu, c.cpu_percent || 0); push(history.mem, 100 * (c.memory_share || 0)); push(history.actions, t.actions_per_s || 0);
  plot(document.getElementById("plot-cpu"), history.cpu, 100);
  plot(document.getElementById("plot-mem"), history.mem, 100);
  plot(document.getElementById("plot-actions"), history.actions);
}

async function poll() {
  try {
    const st = await (await fetch("/api/status")).json();
    if (st.container) {
      document.getElementById("run").textContent = `supervisor ${st.pid}, ` + (st.running ? "running" : "stopped");
      renderGauges(st); renderAgents(st.agents);
    }
  } catch (e) { document.getElementById("run").textContent = "unreachable"; }
}

async function artifacts() {
  const list = await (await fetch("/api/artifacts")).json();
  const body = document.querySelector("#artifacts tbody"); body.replaceChildren();
  for (const a of list) {
    const tr = document.createElement("tr"); tr.id = "artifact-" + a.id;
    const name = cell(a.id); name.style.cursor = "pointer"; name.onclick = () => showHistory(a.id);
    tr.append(name, cell(a.owner, "text"), cell(a.kind, "text"), cell(a.size)); body.append(tr);
  }
}

// An artifact's commits, each with a button that rolls the whole store back to it (as a new commit).
async function showHistory(id) {
  document.getElementById("history-artifact").textContent = id;
  const list = await (await fetch("/api/history/" + encodeURIComponent(id))).json();
  const body = document.querySelector("#history tbody"); body.replaceChildren();
  for (const h of list) {
    const tr = document.createElement("tr"); tr.dataset.commit = h.commit;
    const back = document.createElement("button"); back.textContent = "roll back here"; back.className = "rollback";
    back.onclick = async () => { await control({ type: "rollback", to: h.commit }); artifacts(); showHistory(id); };
    const go = document.createElement("td"); go.append(back);
    tr.append(cell(h.commit.slice(0, 12), "text"), cell(h.author, "text"), cell(h.action, "text"), cell(h.size), go);
    body.append(tr);
  }
}

let seen = 0, skipped = 0;
const events = new EventSource("/api/events");
events.onmessage = (m) => {
  const ev = JSON.parse(m.data), li = document.createElement("li");
  li.value = ev.seq; li.className = "event " + ev.kind;
  li.textContent = `${ev.kind} ${ev.agent || "*"} ${JSON.stringify(ev.fields)}`;
  const list = document.getElementById("events"); list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
  document.getElementById("event-count").textContent = `(${++seen} seen, ${skipped} skipped)`;
};
// At a thousand agents the world makes more events than a page can show: the stream skips to the newest.
events.addEventListener("skipped", (m) => { skipped += parseInt(m.data); });
document.getElementById("inject").onsubmit = (e) => {
  e.preventDefault(); control({ type: "inject", text: e.target.text.value });
};
poll(); artifacts();
// Every 2 s: the supervisor refreshes its status each second, and at 1,000 agents a status is large.
setInterval(poll, 2000); setInterval(artifacts, 5000);
