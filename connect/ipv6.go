package connect

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"time"

	"peerlink/mux"
	"peerlink/nat"
)

// IPv6 paths. Many peers whose IPv4 NATs cannot be punched have global IPv6 addresses
// behind no more than a stateful firewall, as home routers have: once both sides have
// sent to each other (a simultaneous open), datagrams pass. So a node with a global or
// unique-local IPv6 address opens a second socket, udp6, publishes host candidates
// with its port, and every connection whose peer has them too pings them from it, in
// parallel with the IPv4 plan. The first pong from one of them makes the direct path,
// unless IPv4 found one first; an IPv4 path found later does not replace it.
//
// One exception: when the IPv4 plan dials the peer directly (it is public, or on the
// same LAN), that path is as good and says more (direct, not punched), so an IPv6 pong
// is only taken once the IPv4 plan has failed.

const (
	// ipv6CheckInterval is how often each of the peer's IPv6 candidates is pinged
	// while the checks run: a home firewall opens for the peer at the first ping that
	// leaves, so a few rounds are enough.
	ipv6CheckInterval = 50 * time.Millisecond
	// ipv6MinGap is the least time between two pings to one destination.
	ipv6MinGap = 5 * time.Millisecond
)

// usableIPv6 reports whether a is an IPv6 address peers may reach: global unicast or
// unique local, not link-local (it needs a zone), loopback or an IPv4-mapped address.
func usableIPv6(a netip.Addr) bool {
	return a.Is6() && !a.Is4In6() && a.Zone() == "" && a.IsGlobalUnicast()
}

// startIPv6 opens the node's IPv6 socket when ips include a usable IPv6 address, adds
// those addresses as host candidates with the socket's port and starts reading its data.
// A host without IPv6 (or a network that has none, such as the emulator's) just goes
// without.
func (n *Node) startIPv6(ctx context.Context, ips []netip.Addr) {
	var v6 []netip.Addr
	for _, ip := range ips {
		if usableIPv6(ip) && !slices.Contains(v6, ip) {
			v6 = append(v6, ip)
		}
	}
	if len(v6) == 0 {
		return
	}
	conn, err := n.net.ListenPacket(ctx, "udp6", "[::]:0")
	if err != nil {
		n.log.Debug("connect: no IPv6 socket", "err", err)
		return
	}
	setSocketBuffers(conn)
	n.v6 = n.engine.NewMux(conn, mux.Config{Clock: n.cfg.Clock, Logger: n.cfg.Logger})
	port := n.v6.LocalAddr().Port()
	for _, ip := range v6 {
		n.hosts = append(n.hosts, netip.AddrPortFrom(ip, port))
	}
	n.wg.Go(func() { n.dataLoop(n.v6.Data(), nil) })
	n.log.Debug("connect: IPv6 socket up", "port", port, "addresses", v6)
}

// ipv6Checks are a connection's pings toward the peer's IPv6 host candidates.
type ipv6Checks struct {
	peers []netip.AddrPort
	done  chan struct{} // closed when the checks have ended

	// Under the connection's mu:
	afterIPv4 bool           // IPv6 waits for the IPv4 plan to fail (it dials directly)
	ipv4Over  bool           // the IPv4 plan has failed
	answered  netip.AddrPort // a pong that came while waiting for it
}

// splitIPv6 separates the peer's IPv6 host candidates from the IPv4 ones, which the
// IPv4 plan punches toward from the main socket.
func splitIPv6(hosts []netip.AddrPort) (v4, v6 []netip.AddrPort) {
	for _, h := range hosts {
		if h.Addr().Unmap().Is4() {
			v4 = append(v4, h)
		} else if usableIPv6(h.Addr()) {
			v6 = append(v6, h)
		}
	}
	return v4, v6
}

// ipv6Margin is how long before the connection's deadline the checks end, so that a
// connection with nothing to fall back on fails with the IPv4 plan's own error (a
// symmetric pair, say) rather than a timeout.
const ipv6Margin = 250 * time.Millisecond

// startIPv6 takes the peer's host candidates and, when both sides have IPv6 and direct
// paths are allowed, starts the IPv6 checks for the connection's timeout. ipv4 is the
// IPv4 plan's technique. It returns the IPv4 candidates, for the IPv4 plan, and the
// checks (nil when none run).
func (c *Conn) startIPv6(hosts []netip.AddrPort, ipv4 nat.Technique) ([]netip.AddrPort, *ipv6Checks) {
	v4, v6 := splitIPv6(hosts)
	if c.n.v6 == nil || len(v6) == 0 || (c.opts.NoDirect && !c.opts.NoRelay) {
		return v4, nil
	}
	v := &ipv6Checks{peers: v6, done: make(chan struct{}), afterIPv4: methodOf(ipv4) == MethodDirect}
	c.mu.Lock()
	c.ipv6 = v
	c.mu.Unlock()
	// Not the caller's context: that ends when the IPv4 plan gives up, and the
	// checks go on while the relay carries the connection.
	left := c.opts.timeout() - c.n.clock.Now().Sub(c.started) - ipv6Margin
	ctx, cancel := context.WithTimeout(c.n.ctx, max(left, 4*ipv6CheckInterval))
	c.n.wg.Go(func() {
		defer cancel()
		defer close(v.done)
		c.pingIPv6(ctx, v)
	})
	return v4, v
}

// pingIPv6 pings each of the peer's IPv6 candidates every ipv6CheckInterval until a
// direct path exists (this pinging's pong, or the IPv4 plan's) or ctx ends.
func (c *Conn) pingIPv6(ctx context.Context, v *ipv6Checks) {
	ping := appendFrame(nil, c.sendID, kindPing, nil)
	last := make(map[netip.AddrPort]time.Time, len(v.peers))
	interval := max(ipv6CheckInterval, ipv6MinGap)
	for round := 0; ; round++ {
		c.mu.Lock()
		found := c.direct != nil
		c.mu.Unlock()
		if found {
			c.n.log.Debug("connect: IPv6 checks end: a direct path is up", "peer", c.peer.Short(), "rounds", round)
			return
		}
		now := c.n.clock.Now()
		for _, p := range v.peers {
			if t, ok := last[p]; ok && now.Sub(t) < ipv6MinGap {
				continue
			}
			last[p] = now
			if err := c.n.v6.WriteTo(ping, p); err != nil && round == 0 {
				c.n.log.Debug("connect: IPv6 ping", "peer", c.peer.Short(), "to", p, "err", err)
			}
		}
		tick := make(chan struct{})
		t := c.n.clock.AfterFunc(interval, func() { close(tick) })
		select {
		case <-tick:
		case <-ctx.Done():
			t.Stop()
			c.n.log.Debug("connect: IPv6 checks unanswered", "peer", c.peer.Short(), "rounds", round+1, "err", ctx.Err())
			return
		case <-c.done:
			t.Stop()
			return
		}
	}
}

// ipv6Pong takes a pong that arrived on pc from from: when pc is the IPv6 socket, from
// is one of the peer's IPv6 candidates and the connection has no direct path yet, the
// IPv6 path becomes it. The frame carried the connection's secret ID, and a pong
// answers a ping this side sent, so the path works both ways.
func (c *Conn) ipv6Pong(from netip.AddrPort, pc net.PacketConn) {
	v6 := c.n.v6
	if v6 == nil || pc != v6.Data() {
		return
	}
	select {
	case <-c.done:
		return
	default:
	}
	c.mu.Lock()
	v := c.ipv6
	if v == nil || c.direct != nil || !slices.Contains(v.peers, from) {
		c.mu.Unlock()
		return
	}
	if v.afterIPv4 && !v.ipv4Over {
		v.answered = from // taken if the IPv4 plan fails (settle)
		c.mu.Unlock()
		return
	}
	c.adoptIPv6Locked(from)
}

// adoptIPv6Locked makes the IPv6 path to from the connection's direct path. It is called
// with c.mu held and releases it.
func (c *Conn) adoptIPv6Locked(from netip.AddrPort) {
	c.direct, c.directAddr = c.n.v6, from
	c.directMethod = MethodPunched
	c.technique = nat.SimplePunch
	c.mu.Unlock()
	c.n.log.Debug("connect: IPv6 path up", "peer", c.peer.Short(), "to", from)
	c.pathUp(MethodPunched)
	if !c.n.cfg.PathCheck.Disabled {
		c.n.wg.Go(c.watchDirect)
	}
}

// settle is called once the IPv4 plan has ended with err (non-nil): it returns nil when
// the IPv6 checks made the direct path. With a relay to fall back on, the checks go on
// in the background (and upgrade the connection when they succeed) while the caller
// falls back; without one (noFallback), it waits for them to end first.
func (v *ipv6Checks) settle(c *Conn, err error, noFallback bool) error {
	if v == nil {
		return err
	}
	c.mu.Lock()
	v.ipv4Over = true
	if v.answered.IsValid() && c.direct == nil {
		c.adoptIPv6Locked(v.answered)
	} else {
		c.mu.Unlock()
	}
	if noFallback {
		<-v.done
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.direct != nil && c.direct == c.n.v6 {
		return nil
	}
	return err
}
