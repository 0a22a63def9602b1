// Shared helpers of peerlink's dashboards: no framework, the DOM only.
"use strict";

// el makes an element with text (never HTML: every value comes from the network).
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

// fill replaces a table body's rows, or shows one row saying there is nothing.
function fill(tbody, rows, cols, emptyText) {
  tbody.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", emptyText, "empty");
    td.colSpan = cols;
    tr.append(td);
    tbody.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
    tbody.append(tr);
  }
}

function td(content, cls) {
  const e = el("td", null, cls);
  if (content instanceof Node) e.append(content); else e.textContent = content;
  return e;
}

function num(v, digits, unit) {
  if (v === null || v === undefined) return td("—", "num muted");
  return td(Number(v).toFixed(digits) + (unit || ""), "num");
}

function methodBadge(m) {
  return el("span", m, "badge m-" + m);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function rate(bps) { return bytes(bps) + "/s"; }

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.floor(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

// live follows the server's event stream and calls render with each state; the
// connection badge says whether updates are arriving.
function live(url, event, render) {
  const badge = document.getElementById("live");
  const src = new EventSource(url);
  src.addEventListener(event, (e) => {
    badge.textContent = "● live";
    badge.className = "live";
    render(JSON.parse(e.data));
  });
  src.onerror = () => {
    badge.textContent = "● reconnecting…";
    badge.className = "down";
  };
}
