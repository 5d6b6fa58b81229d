"use strict";
const DATA = JSON.parse(document.getElementById("graph-data").textContent);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function linkTo(url, text) {
  const a = el("a", text);
  a.href = url; a.target = "_blank"; a.rel = "noopener noreferrer";
  return a;
}
function showTokens(list) { return list.map(t => JSON.stringify(t)).join(" "); }
function safeLink(url) { return typeof url === "string" && /^https:\/\//.test(url) ? url : null; }
function sortable(table, rows, columns, render, key, dir) {
  const head = el("tr");
  for (const c of columns) {
    const th = el("th", c.label);
    th.addEventListener("click", () => { dir = key === c.key ? -dir : (c.numeric ? -1 : 1); key = c.key; fill(); });
    head.append(th);
  }
  const thead = el("thead"), tbody = el("tbody");
  thead.append(head);
  table.append(thead, tbody);
  function fill() {
    const sorted = rows.slice().sort((a, b) => (a[key] < b[key] ? -dir : a[key] > b[key] ? dir : 0));
    tbody.replaceChildren(...sorted.map(render));
  }
  fill();
}
