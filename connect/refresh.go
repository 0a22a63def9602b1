package connect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"

	"peerlink/detect"
	"peerlink/nat"
	"peerlink/relay"
	"peerlink/signal"
)

// A node's addresses do not last: NATs rebind mappings (a router reboots, a
// conntrack table is flushed, a carrier hands out a new public IP), relays restart,
// laptops change networks. The node re-learns its reflexive address and watches its
// relay allocation, and when either moves it publishes the new candidates, tells the
// peers of its connections, and re-confirms the relayed paths; connections follow a
// peer's direct path to its new address (see Conn.peerCandidate and roaming in
// Conn.receive). Nothing of this needs the application: streams over the connection
// see a short loss, which QUIC repairs.

// relayRecheck is how soon a node without its relay tries to allocate again.
const relayRecheck = 5 * time.Second

func (n *Node) refreshInterval() time.Duration {
	switch {
	case n.cfg.Refresh < 0:
		return 0
	case n.cfg.Refresh == 0:
		return 20 * time.Second
	}
	return n.cfg.Refresh
}

// NetworkChanged tells the node its network may have changed (an interface or address
// came or went, the machine woke up): it re-learns its public address and checks its
// relay at once, and connections that fell back to the relay retry their direct path.
// It does not block.
func (n *Node) NetworkChanged() {
	select {
	case n.poke <- struct{}{}:
	default:
	}
}

// maintain runs the refreshes until the node closes.
func (n *Node) maintain() {
	every := n.refreshInterval()
	// A detected profile is re-detected after a network change; a given one is known.
	var profiles <-chan detect.Change
	if n.cfg.Profile == nil && len(n.cfg.STUN) > 0 {
		ch, unsub := n.det.Subscribe()
		defer unsub()
		profiles = ch
	}
	for {
		wait := every
		var lost <-chan struct{}
		rc := n.relayConn()
		if rc != nil {
			lost = rc.Lost()
		} else if n.cfg.Relay != nil && (wait == 0 || wait > relayRecheck) {
			wait = relayRecheck
		}
		var tick chan struct{}
		var t interface{ Stop() bool }
		if wait > 0 {
			tick = make(chan struct{})
			t = n.clock.AfterFunc(wait, func() { close(tick) })
		}
		poked := false
		select {
		case <-n.ctx.Done():
			if t != nil {
				t.Stop()
			}
			return
		case <-tick:
		case <-lost:
		case <-n.poke:
			poked = true
			n.det.Refresh()
		case ch := <-profiles:
			if t != nil {
				t.Stop()
			}
			n.profileChanged(ch.New)
			continue
		}
		if t != nil {
			t.Stop()
		}
		n.refresh(poked)
	}
}

// refresh re-checks the relay allocation and the reflexive address, and announces
// what moved.
func (n *Node) refresh(poked bool) {
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	var moved []signal.Candidate
	var newRelay *relay.Conn
	if n.cfg.Relay != nil {
		rc := n.relayConn()
		if rc != nil && poked {
			rc.Check(ctx)
		}
		if rc != nil && rc.Err() != nil {
			n.log.Info("connect: relay allocation lost, allocating again", "err", rc.Err())
			n.dropRelay(rc)
			rc = nil
		}
		if rc == nil {
			if c, err := n.ensureRelay(ctx); err == nil {
				newRelay = c
				moved = append(moved, relayedCandidate(addrPortOf(c.RelayedAddr())))
			}
		}
	}
	if ext, ok := n.mappedAddr(); ok {
		// The gateway's mapping is the public address while it lasts; STUN sees the
		// NAT's own mapping for the STUN server, which is not the one peers use.
		if ext != n.reflexive() {
			n.addrMu.Lock()
			n.srflx = ext
			n.profile.PublicIP, n.profile.PublicPort = ext.Addr(), ext.Port()
			n.addrMu.Unlock()
			moved = append(moved, srflxCandidate(ext))
		}
	} else if n.stunSrv.IsValid() && !n.Profile().UDPBlocked {
		if a, err := n.main.Binding(ctx, n.stunSrv, 200*time.Millisecond); err == nil && a != n.reflexive() {
			n.addrMu.Lock()
			old := n.srflx
			n.srflx = a
			n.profile.PublicIP, n.profile.PublicPort = a.Addr(), a.Port()
			n.addrMu.Unlock()
			n.log.Info("connect: public address moved", "from", old, "to", a)
			moved = append(moved, srflxCandidate(a))
		}
	}
	conns := n.liveConns()
	if poked {
		for _, c := range conns {
			c.retrySoon.Store(true)
		}
	}
	if len(moved) == 0 {
		return
	}
	if err := n.signal().Publish(ctx, n.info()); err != nil {
		n.log.Debug("connect: publishing moved candidates", "err", err)
	}
	for _, c := range conns {
		if newRelay != nil {
			c.relayMoved()
		}
		for _, cand := range moved {
			cand := cand
			if err := n.signal().Send(ctx, &signal.Message{Type: signal.TypeCandidate, To: c.peer, Session: c.session, Candidate: &cand}); err != nil {
				n.log.Debug("connect: telling a peer of a moved candidate", "peer", c.peer.Short(), "err", err)
			}
		}
	}
}

// profileChanged takes a re-detected NAT profile and publishes it. The public address
// stays the main socket's, which is what peers reach.
func (n *Node) profileChanged(p nat.Profile) {
	n.addrMu.Lock()
	old := n.profile
	p.PublicIP, p.PublicPort = old.PublicIP, old.PublicPort
	n.profile = p
	n.addrMu.Unlock()
	if old.Type() == p.Type() && old.UDPBlocked == p.UDPBlocked && old.Open == p.Open {
		return
	}
	n.log.Info("connect: NAT profile changed", "from", old.String(), "to", p.String())
	ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
	defer cancel()
	if err := n.signal().Publish(ctx, n.info()); err != nil {
		n.log.Debug("connect: publishing the new profile", "err", err)
	}
}

// liveConns are the node's connections made through signaling.
func (n *Node) liveConns() []*Conn {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]*Conn, 0, len(n.sessions))
	for _, c := range n.sessions {
		out = append(out, c)
	}
	return out
}

// dropRelay forgets a lost allocation (unless another took its place already), so the
// next ensureRelay allocates afresh.
func (n *Node) dropRelay(rc *relay.Conn) {
	n.relayMu.Lock()
	if n.relay == rc {
		n.relay, n.relayErr = nil, nil
	}
	n.relayMu.Unlock()
	rc.Close()
}

func srflxCandidate(a netip.AddrPort) signal.Candidate {
	return signal.Candidate{Type: signal.CandidateSrflx, IP: a.Addr(), Port: a.Port(), Priority: signal.CandidatePriority(signal.CandidateSrflx, 65535)}
}

func relayedCandidate(a netip.AddrPort) signal.Candidate {
	return signal.Candidate{Type: signal.CandidateRelayed, IP: a.Addr(), Port: a.Port(), Priority: signal.CandidatePriority(signal.CandidateRelayed, 65535)}
}

// relayMoved re-confirms the relayed path through the node's new allocation: the
// peer learns the new relayed address from the pings (relayConfirmed).
func (c *Conn) relayMoved() {
	c.mu.Lock()
	peer := c.relayPeer
	if peer.IsValid() {
		c.relayUp = false
	}
	c.mu.Unlock()
	if !peer.IsValid() || c.opts.NoRelay {
		return
	}
	c.startRelayPing(peer)
}

func (c *Conn) startRelayPing(peer netip.AddrPort) {
	ctx, cancel := context.WithTimeout(c.n.ctx, c.opts.timeout())
	c.n.wg.Go(func() {
		defer cancel()
		c.relayPing(ctx, peer)
	})
}

// peerCandidate takes a candidate the peer sent after the connection was made: its
// relayed or public address moved.
func (c *Conn) peerCandidate(cand signal.Candidate) {
	a := cand.AddrPort()
	if !a.IsValid() {
		return
	}
	switch cand.Type {
	case signal.CandidateRelayed:
		if c.opts.NoRelay {
			return
		}
		c.mu.Lock()
		same := c.relayPeer == a && c.relayUp
		c.relayPeer, c.relayUp = a, c.relayUp && c.relayPeer == a
		c.mu.Unlock()
		// Without an allocation of its own now, the node pings the new address once
		// it has one again (relayMoved).
		if !same && c.n.relayConn() != nil {
			c.n.log.Debug("connect: peer's relayed address moved", "peer", c.peer.Short(), "to", a)
			c.startRelayPing(a)
		}
	case signal.CandidateSrflx, signal.CandidatePrflx:
		c.mu.Lock()
		direct, cur := c.direct, c.directAddr
		c.mu.Unlock()
		if direct == nil || cur == a {
			return
		}
		// Ping the new address for a while: the pings open this side's NAT toward it,
		// and the first pong moves the direct path there.
		c.n.log.Debug("connect: peer's public address moved, probing it", "peer", c.peer.Short(), "to", a)
		ping := appendFrame(nil, c.sendID, kindPing, nil)
		c.n.wg.Go(func() {
			for range 25 {
				c.mu.Lock()
				moved := c.directAddr == a
				c.mu.Unlock()
				if moved {
					return
				}
				direct.WriteTo(ping, a)
				select {
				case <-time.After(200 * time.Millisecond):
				case <-c.done:
					return
				case <-c.n.ctx.Done():
					return
				}
			}
		})
	}
}

// roam moves the direct path to from, where a pong came from on the direct socket:
// the peer's NAT gave it a new address, and a pong there answers a ping this side
// sent, so the new address works both ways. Frames carry the connection's secret ID,
// so no one off the path can move it.
func (c *Conn) roam(from netip.AddrPort, pc net.PacketConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.direct == nil || !c.settled || from == c.directAddr || c.direct.Data() != pc {
		return false
	}
	c.n.log.Info("connect: peer's direct address moved", "peer", c.peer.Short(), "from", c.directAddr, "to", from)
	c.directAddr = from
	return true
}

// checkRelaySoon asks the node to check its relay allocation now: the relayed path
// went silent.
func (n *Node) checkRelaySoon() {
	if rc := n.relayConn(); rc != nil {
		n.wg.Go(func() {
			ctx, cancel := context.WithTimeout(n.ctx, 20*time.Second)
			defer cancel()
			if err := rc.Check(ctx); err != nil && errors.Is(err, relay.ErrAllocationLost) {
				n.log.Debug("connect: relay check after silence", "err", err)
			}
		})
	}
}
