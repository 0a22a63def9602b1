// The agent's dashboard: /api/events carries the status JSON, POST /api/connect
// connects to a peer.
"use strict";

const policyWords = { ei: "endpoint-independent", hd: "address-dependent", pd: "address and port-dependent", unknown: "unknown" };
const allocWords = { pp: "port-preserving", pc: "port-contiguous", rd: "random", unknown: "unknown" };

function set(id, text) { document.getElementById(id).textContent = text; }

function render(st) {
  set("node", st.node || "…");
  set("server", st.server || "the local network (mDNS)");
  set("state", st.up ? "node up" : "node down: reconnecting to the rendezvous server");
  set("candidates", (st.candidates || []).join(", ") || "—");
  set("counts", `${st.connections.length} open · ${st.accepted} accepted · ${st.initiated} made here`);
  const p = st.profile;
  if (p) {
    set("nat", st.nat || "—");
    set("mapping", `${policyWords[p.mapping] || p.mapping} (${p.mapping})`);
    set("filtering", `${policyWords[p.filtering] || p.filtering} (${p.filtering})`);
    let alloc = `${allocWords[p.allocation] || p.allocation} (${p.allocation})`;
    if (p.allocation === "pc") alloc += `, delta ${p.port_delta > 0 ? "+" : ""}${p.port_delta || 0}`;
    set("allocation", alloc);
    set("public", p.public_ip ? (p.public_ip.includes(":") ? `[${p.public_ip}]` : p.public_ip) + ":" + p.public_port : "—");
    set("hairpin", p.hairpinning ? "yes" : "no");
    set("confidence", p.confidence);
    set("detected", p.detected_at ? new Date(p.detected_at).toLocaleTimeString() : "—");
  }
  const changes = document.getElementById("changes");
  changes.replaceChildren();
  if (st.profile_changes.length === 0) changes.append(el("li", "none since the agent started", "empty"));
  for (const c of st.profile_changes) {
    changes.append(el("li", `${new Date(c.time).toLocaleTimeString()}: ${c.from} → ${c.to}`));
  }
  renderParty(st.party);
  fill(document.getElementById("peers"), st.connections.map((c) => {
    const peer = td(c.peer.slice(0, 16) + "…", "mono");
    peer.title = c.peer;
    peer.dataset.peer = c.peer;
    const q = c.quality === null ? td("—", "num muted") : td(String(c.quality), "num");
    return [
      peer,
      td(c.outgoing ? "outgoing" : "incoming"),
      td(methodBadge(c.method)),
      td(c.technique),
      num(c.rtt_ms, 1, " ms"),
      num(c.jitter_ms, 1, " ms"),
      c.loss === null ? td("—", "num muted") : td((c.loss * 100).toFixed(0) + " %", "num"),
      q,
      num(c.time_to_first_path_ms, 0, " ms"),
      td(String(c.datagrams), "num"),
      td(ago(c.since)),
    ];
  }), 11, "no connections");
}

// renderParty shows the party's virtual LAN when the agent runs one (peerlink up).
function renderParty(p) {
  const card = document.getElementById("party-card");
  card.hidden = !p;
  if (!p) return;
  set("party-name", p.party);
  set("party-summary", `interface ${p.interface} · ${p.prefix4} · ${p.prefix6} · broadcasts sent ${p.broadcastsSent}, received ${p.broadcastsReceived}`);
  fill(document.getElementById("party-members"), p.members.map((m) => {
    const node = td(m.nodeID.slice(0, 16) + "…", "mono");
    node.title = m.nodeID;
    let method = m.self ? td("this node", "muted") : !m.online ? td("offline", "muted") : !m.connected ? td("connecting…", "muted") : td(methodBadge(m.method));
    return [
      node, td(m.ipv4, "mono"), td(m.ipv6, "mono"), method,
      m.latencyMs ? num(m.latencyMs, 1, " ms") : td("—", "num muted"),
      td(bytes(m.rxBytes), "num"), td(bytes(m.txBytes), "num"),
    ];
  }), 7, "no members");
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

document.addEventListener("DOMContentLoaded", () => {
  live("api/events", "status", render);
  const form = document.getElementById("connect-form");
  const input = document.getElementById("connect-node");
  const button = document.getElementById("connect-button");
  const result = document.getElementById("connect-result");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    button.disabled = true;
    result.className = "muted";
    result.textContent = "connecting…";
    try {
      const resp = await fetch("api/connect", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ node: input.value.trim() }),
      });
      const body = await resp.json().catch(() => ({ error: resp.statusText }));
      if (!resp.ok) throw new Error(body.error || resp.statusText);
      result.className = "ok";
      result.textContent = `connected to ${body.peer.slice(0, 16)}…: ${body.method} (technique ${body.technique})`;
      input.value = "";
    } catch (err) {
      result.className = "error";
      result.textContent = "error: " + err.message;
    } finally {
      button.disabled = false;
    }
  });
});
