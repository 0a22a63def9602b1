package partynet

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"peerlink/connect"
	"peerlink/identity"
)

// probeLen is a probe's size: its kind and the sender's send time.
const probeLen = 9

// sendProbes pings every connected member; the pongs give each member's latency over
// its current path (direct, punched or relayed), whatever WireGuard is doing.
func (d *Device) sendProbes() {
	var p [probeLen]byte
	p[0] = probePing
	binary.BigEndian.PutUint64(p[1:], uint64(time.Now().UnixNano()))
	d.mu.Lock()
	var conns []*connect.Conn
	for _, m := range d.members {
		if m.conn != nil {
			conns = append(conns, m.conn)
		}
	}
	d.mu.Unlock()
	for _, c := range conns {
		c.Send(p[:])
	}
}

// onProbe answers a member's ping and takes the round trip from a pong.
func (d *Device) onProbe(from identity.NodeID, b []byte) {
	if len(b) != probeLen {
		return
	}
	switch b[0] {
	case probePing:
		if s := d.bind.sender(from); s != nil {
			pong := [probeLen]byte{probePong}
			copy(pong[1:], b[1:])
			s.Send(pong[:])
		}
	case probePong:
		sent := time.Unix(0, int64(binary.BigEndian.Uint64(b[1:])))
		rtt := time.Since(sent)
		if rtt < 0 || rtt > time.Minute {
			return
		}
		d.mu.Lock()
		if m := d.members[from]; m != nil {
			if m.rtt == 0 {
				m.rtt = rtt
			} else {
				m.rtt = (7*m.rtt + rtt) / 8
			}
			m.lastPong = time.Now()
		}
		d.mu.Unlock()
	}
}

// MemberStatus is one member as this node sees it.
type MemberStatus struct {
	NodeID identity.NodeID `json:"nodeID"`
	IPv4   netip.Addr      `json:"ipv4"`
	IPv6   netip.Addr      `json:"ipv6"`
	// Self marks this node.
	Self bool `json:"self,omitempty"`
	// Online is the rendezvous server's word at the last poll.
	Online bool `json:"online"`
	// Connected: a peerlink connection carries the member's WireGuard traffic.
	Connected bool `json:"connected"`
	// Method is how: direct, punched, relayed or relayed-https.
	Method string `json:"method,omitempty"`
	// LatencyMS is the smoothed round trip over the connection, zero before one is
	// measured.
	LatencyMS float64 `json:"latencyMs,omitempty"`
	// Handshake is WireGuard's last handshake with the member; RxBytes and TxBytes are
	// what WireGuard received from and sent to it.
	Handshake time.Time `json:"handshake,omitzero"`
	RxBytes   uint64    `json:"rxBytes"`
	TxBytes   uint64    `json:"txBytes"`
	// Dropped counts datagrams from the member lost because the node could not keep
	// up (the connection's receive queue was full).
	Dropped uint64 `json:"dropped,omitempty"`
}

// Status is the device's view of the party.
type Status struct {
	Party     string          `json:"party"`
	Interface string          `json:"interface"`
	Owner     identity.NodeID `json:"owner"`
	Prefix4   netip.Prefix    `json:"prefix4"`
	Prefix6   netip.Prefix    `json:"prefix6"`
	Members   []MemberStatus  `json:"members"`
	// BroadcastsSent counts broadcasts and multicasts forwarded to the members;
	// BroadcastsReceived those from members written to the interface.
	BroadcastsSent     uint64 `json:"broadcastsSent"`
	BroadcastsReceived uint64 `json:"broadcastsReceived"`
	// Dropped counts datagrams WireGuard could not take in time, from all members.
	Dropped uint64 `json:"dropped,omitempty"`
}

// Status returns the party's members with their addresses, connection method and
// latency, this node first.
func (d *Device) Status() Status {
	wgPeers := d.wgPeers()
	d.mu.Lock()
	s := Status{
		Party: d.cfg.Party, Interface: d.name, Owner: d.party.Owner,
		Prefix4: d.party.Prefix4, Prefix6: d.party.Prefix6,
		Members: []MemberStatus{{NodeID: d.self, IPv4: d.me.IPv4, IPv6: d.me.IPv6, Self: true, Online: true}},
	}
	var others []MemberStatus
	for id, m := range d.members {
		ms := MemberStatus{NodeID: id, IPv4: m.m.IPv4, IPv6: m.m.IPv6, Online: m.m.Online}
		if m.conn != nil {
			ms.Connected = true
			ms.Method = m.conn.Method().String()
			ms.LatencyMS = float64(m.rtt.Microseconds()) / 1000
			ms.Dropped = m.conn.Stats().Dropped
		}
		if w, ok := wgPeers[m.key]; ok && m.key != "" {
			ms.Handshake, ms.RxBytes, ms.TxBytes = w.handshake, w.rx, w.tx
		}
		others = append(others, ms)
	}
	d.mu.Unlock()
	slices.SortFunc(others, func(a, b MemberStatus) int { return a.IPv4.Compare(b.IPv4) })
	s.Members = append(s.Members, others...)
	s.BroadcastsSent, s.BroadcastsReceived = d.tun.forwarded.Load(), d.tun.received.Load()
	s.Dropped = d.bind.dropped.Load()
	return s
}

type wgPeer struct {
	handshake time.Time
	rx, tx    uint64
}

// wgPeers reads WireGuard's per-peer figures, keyed by public key (hex).
func (d *Device) wgPeers() map[string]wgPeer {
	out := make(map[string]wgPeer)
	conf, err := d.wg.IpcGet()
	if err != nil {
		return out
	}
	var key string
	var p wgPeer
	var sec int64
	flush := func() {
		if key != "" {
			if sec > 0 {
				p.handshake = time.Unix(sec, 0)
			}
			out[key] = p
		}
	}
	for line := range strings.SplitSeq(conf, "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		switch k {
		case "public_key":
			flush()
			key, p, sec = v, wgPeer{}, 0
		case "last_handshake_time_sec":
			sec, _ = strconv.ParseInt(v, 10, 64)
		case "rx_bytes":
			p.rx, _ = strconv.ParseUint(v, 10, 64)
		case "tx_bytes":
			p.tx, _ = strconv.ParseUint(v, 10, 64)
		}
	}
	flush()
	return out
}
