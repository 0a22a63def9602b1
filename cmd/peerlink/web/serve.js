// The server dashboard: /api/events carries the servers' state every second.
"use strict";

function facts(id, pairs) {
  const dl = document.getElementById(id);
  dl.replaceChildren();
  for (const [k, v] of pairs) dl.append(el("dt", k), el("dd", v));
}

// short shows the start of a long name, all of it on hover.
function short(s, n) {
  const c = td(s.length > n ? s.slice(0, n) + "…" : s, "mono");
  c.title = s;
  return c;
}

function render(st) {
  document.getElementById("uptime").textContent = "up " + ago(st.started);
  const rv = st.rendezvous;
  facts("rendezvous", rv ? [
    ["peers", `${rv.authenticated} authenticated · ${rv.connections} connections`],
    ["messages routed", `${rv.routed} (${rv.routed_per_sec.toFixed(1)}/s)`],
    ["errors", String(rv.errors)],
    ["closed for abuse", String(rv.abusive)],
  ] : [["state", "off"]]);
  const s = st.stun;
  facts("stun", s ? [
    ["requests", `${s.requests_per_sec.toFixed(1)}/s`],
    ["total", `${s.requests} requests · ${s.responses} answered`],
    ["rate-limited", String(s.rate_limited)],
  ] : [["state", "off"]]);
  const r = st.relay;
  facts("relay", r ? [
    ["state", r.enabled ? "taking sessions" : "disabled: new sessions refused"],
    ["sessions", `${r.sessions} now · ${r.sessions_total} in all · ${r.refused} refused`],
    ["client → peers", `${bytes(r.bytes_to_peers)} (${rate(r.to_peers_bytes_per_sec)})`],
    ["peers → client", `${bytes(r.bytes_to_clients)} (${rate(r.to_clients_bytes_per_sec)})`],
  ] : [["state", "off"]]);

  fill(document.getElementById("peers"), (rv ? rv.peers : []).map((p) => {
    const node = td(p.node, "mono");
    node.dataset.peer = p.node;
    return [node, td(p.remote, "mono"), td(ago(p.last_heard) + " ago")];
  }), 3, rv ? "no peers" : "rendezvous is off");

  fill(document.getElementById("sessions"), (r ? r.list : []).map((x) => [
    td(String(x.id), "num"), short(x.user, 28), td(x.transport), td(x.client, "mono"),
    td(x.peers.join(", ") || "—", "mono"),
    td(bytes(x.bytes_in), "num"), td(rate(x.in_bytes_per_sec), "num"),
    td(bytes(x.bytes_out), "num"), td(rate(x.out_bytes_per_sec), "num"),
    td(ago(x.start)),
  ]), 10, r ? "no sessions" : "relay is off");

  document.getElementById("relays-error").textContent = st.relays_error ? "registry: " + st.relays_error : "";
  fill(document.getElementById("relays"), st.relays.map((x) => [
    short(x.node, 16), td(x.endpoints.join(", "), "mono"),
    td(String(x.load), "num"), td(x.capacity ? String(x.capacity) : "—", "num"),
    td(ago(x.updated) + " ago"),
  ]), 5, "no relays registered");
}

document.addEventListener("DOMContentLoaded", () => live("api/events", "status", render));
