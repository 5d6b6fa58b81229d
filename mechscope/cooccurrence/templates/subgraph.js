const canvas = document.getElementById("graph"), ctx = canvas.getContext("2d"), tip = document.getElementById("tip");
const nodes = DATA.nodes.map(n => Object.assign({}, n, {degree: 0, nbrs: []}));
const at = new Map(nodes.map((n, i) => [n.id, i]));
const edges = DATA.edges.map(([a, b, w]) => [at.get(a), at.get(b), w]);
for (const [a, b, w] of edges) {
  nodes[a].degree++; nodes[b].degree++;
  nodes[a].nbrs.push([b, w]); nodes[b].nbrs.push([a, w]);
}
for (const n of nodes) n.nbrs.sort((p, q) => q[1] - p[1]);
const maxAct = Math.max(1, ...nodes.map(n => n.activations));
for (const n of nodes) n.r = 4 + 12 * Math.sqrt(n.activations / maxAct);
const BUCKETS = 10, buckets = Array.from({length: BUCKETS}, () => []);
for (const e of edges) buckets[Math.min(BUCKETS - 1, Math.floor(e[2] * BUCKETS))].push(e);
const view = {scale: 1, x: 0, y: 0};
let hover = -1, selected = -1, drag = null, queued = false;

function sx(n) { return n.x * view.scale + view.x; }
function sy(n) { return -n.y * view.scale + view.y; }
function fit() {
  const w = canvas.clientWidth, h = canvas.clientHeight, m = 30;
  const xs = nodes.map(n => n.x), ys = nodes.map(n => -n.y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  view.scale = Math.min((w - 2 * m) / Math.max(x1 - x0, 1e-6), (h - 2 * m) / Math.max(y1 - y0, 1e-6));
  if (!isFinite(view.scale) || view.scale <= 0) view.scale = 1;
  view.x = w / 2 - view.scale * (x0 + x1) / 2;
  view.y = h / 2 - view.scale * (y0 + y1) / 2;
}
function resize() {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(canvas.clientWidth * dpr);
  canvas.height = Math.round(canvas.clientHeight * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  fit();
  draw();
}
function request() { if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; draw(); }); } }
function draw() {
  ctx.clearRect(0, 0, canvas.clientWidth, canvas.clientHeight);
  const focus = selected >= 0 ? selected : hover;
  ctx.strokeStyle = "#3a5f8f";
  buckets.forEach((list, k) => {
    if (!list.length) return;
    const w = (k + 0.5) / BUCKETS;
    ctx.globalAlpha = focus >= 0 ? 0.08 : 0.15 + 0.75 * w;
    ctx.lineWidth = 0.5 + 4 * w;
    ctx.beginPath();
    for (const [a, b] of list) { ctx.moveTo(sx(nodes[a]), sy(nodes[a])); ctx.lineTo(sx(nodes[b]), sy(nodes[b])); }
    ctx.stroke();
  });
  if (focus >= 0) {
    ctx.strokeStyle = "#d9822b";
    const f = nodes[focus];
    for (const [o, w] of f.nbrs) {
      ctx.globalAlpha = 0.3 + 0.7 * w;
      ctx.lineWidth = 0.5 + 4 * w;
      ctx.beginPath(); ctx.moveTo(sx(f), sy(f)); ctx.lineTo(sx(nodes[o]), sy(nodes[o])); ctx.stroke();
    }
  }
  ctx.globalAlpha = 1;
  const labels = nodes.length <= 100 || view.scale > 600;
  ctx.font = "11px system-ui, sans-serif";
  nodes.forEach((n, i) => {
    ctx.beginPath();
    ctx.arc(sx(n), sy(n), n.r, 0, 2 * Math.PI);
    ctx.fillStyle = i === focus ? "#d9822b" : "#6c9bd2";
    ctx.fill();
    ctx.lineWidth = 1; ctx.strokeStyle = "#fff"; ctx.stroke();
    if (labels || i === focus) { ctx.fillStyle = "#222"; ctx.fillText(String(n.id), sx(n) + n.r + 2, sy(n) + 4); }
  });
}
function hit(px, py) {
  for (let i = nodes.length - 1; i >= 0; i--) {
    const n = nodes[i], dx = sx(n) - px, dy = sy(n) - py;
    if (dx * dx + dy * dy <= (n.r + 3) * (n.r + 3)) return i;
  }
  return -1;
}
function showTip(i, cx, cy) {
  if (i < 0) { tip.style.display = "none"; return; }
  const n = nodes[i];
  tip.replaceChildren(el("div", "latent " + n.id, "head"), el("div", "active on " + n.activations + " tokens"));
  if (n.top_input.length) tip.append(el("div", "top input tokens: " + showTokens(n.top_input)));
  if (n.top_output.length) tip.append(el("div", "top output tokens: " + showTokens(n.top_output)));
  const shown = n.nbrs.slice(0, 8).map(([o, w]) => nodes[o].id + " (" + w.toFixed(3) + ")").join(", ");
  tip.append(el("div", n.degree + " edges; strongest: " + shown));
  const url = safeLink(n.link);
  if (url) tip.append(linkTo(url, "open on Neuronpedia"));
  tip.style.display = "block";
  tip.style.left = Math.min(cx + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = Math.min(cy + 14, window.innerHeight - tip.offsetHeight - 8) + "px";
}
function local(ev) { const r = canvas.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; }
canvas.addEventListener("pointerdown", ev => {
  const [px, py] = local(ev), i = hit(px, py);
  drag = {node: i, px, py, vx: view.x, vy: view.y, moved: false};
  canvas.setPointerCapture(ev.pointerId);
});
canvas.addEventListener("pointermove", ev => {
  const [px, py] = local(ev);
  if (drag) {
    if (Math.abs(px - drag.px) + Math.abs(py - drag.py) > 3) drag.moved = true;
    if (!drag.moved) return;
    if (drag.node >= 0) {
      nodes[drag.node].x = (px - view.x) / view.scale;
      nodes[drag.node].y = -(py - view.y) / view.scale;
    } else {
      view.x = drag.vx + px - drag.px; view.y = drag.vy + py - drag.py;
    }
    request();
    return;
  }
  const i = hit(px, py);
  if (i !== hover) { hover = i; request(); }
  if (selected < 0) showTip(hover, ev.clientX, ev.clientY);
});
canvas.addEventListener("pointerup", ev => {
  if (drag && !drag.moved) { selected = drag.node; showTip(selected, ev.clientX, ev.clientY); markRow(); request(); }
  drag = null;
});
canvas.addEventListener("pointerleave", () => { if (selected < 0 && !drag) { hover = -1; showTip(-1); request(); } });
canvas.addEventListener("wheel", ev => {
  ev.preventDefault();
  const [px, py] = local(ev), f = Math.exp(-ev.deltaY * 0.0015);
  view.x = px - (px - view.x) * f; view.y = py - (py - view.y) * f; view.scale *= f;
  request();
}, {passive: false});
canvas.addEventListener("dblclick", () => { fit(); request(); });
window.addEventListener("resize", resize);

const rowOf = new Map();
function markRow() { for (const [i, tr] of rowOf) tr.classList.toggle("sel", i === selected); }
sortable(document.getElementById("nodes"), nodes.map((n, i) => Object.assign({i}, n)), [
  {key: "id", label: "latent", numeric: true},
  {key: "activations", label: "active on (tokens)", numeric: true},
  {key: "degree", label: "edges", numeric: true},
  {key: "top_input", label: "top input tokens"},
  {key: "top_output", label: "top output tokens"},
  {key: "link", label: "Neuronpedia"},
], n => {
  const tr = el("tr");
  tr.append(el("td", String(n.id)), el("td", String(n.activations)), el("td", String(n.degree)),
            el("td", showTokens(n.top_input), "tok"), el("td", showTokens(n.top_output), "tok"));
  const td = el("td"), url = safeLink(n.link);
  if (url) td.append(linkTo(url, "link"));
  tr.append(td);
  tr.addEventListener("click", () => { selected = n.i; markRow(); request(); });
  rowOf.set(n.i, tr);
  return tr;
}, "activations", -1);
resize();
