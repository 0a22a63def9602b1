package natlab

import (
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"peerlink/clock"
)

// DefaultQueueLen is how many packets a socket holds unread when Config.QueueLen is zero.
const DefaultQueueLen = 1024

// Config configures a Network. The zero value is a usable network: seed 0, the real
// clock, no logging.
type Config struct {
	// Seed drives every random choice in the network.
	Seed uint64
	// Clock times link delays, mapping expiry and connection deadlines; nil is the
	// real clock.
	Clock clock.Clock
	// Logger receives a debug record for each dropped packet; nil is quiet.
	Logger *slog.Logger
	// QueueLen bounds each socket's unread packets; beyond it packets are dropped as a
	// kernel drops on a full receive buffer. Zero means DefaultQueueLen.
	QueueLen int
}

// Network is an emulated internet with NATs. Its methods are safe for concurrent use.
// Elements are added with AddPublicHost and AddNAT; they panic on a configuration
// mistake (duplicate name or address, missing address), as a test fixture should.
type Network struct {
	seed     uint64
	clk      clock.Clock
	log      *slog.Logger
	queueLen int

	// mu guards all routing state: segments, NAT tables, socket registries, counters.
	// Packets are forwarded while holding it, so a packet's whole zero-latency path is
	// one atomic step.
	mu       sync.Mutex
	closed   bool
	internet *segment
	names    map[string]bool
	hosts    []*Host
	counts   counts
	pending  map[*delayed]struct{}
	inflight sync.WaitGroup // delayed callbacks not yet finished or stopped
}

// segment is one broadcast domain: the internet, or the LAN behind a NAT.
type segment struct {
	owner *NAT // nil for the internet
	addrs map[netip.Addr]attachment
}

// attachment is what owns an address in a segment: a host, or a NAT (its public side,
// or, for a firewall, an address of a host behind it).
type attachment struct {
	host *Host
	nat  *NAT
}

type packet struct {
	src, dst netip.AddrPort
	payload  []byte
}

// delayed is a packet in flight on a link with latency.
type delayed struct{ t clock.Timer }

// New returns an empty network.
func New(cfg Config) *Network {
	q := cfg.QueueLen
	if q <= 0 {
		q = DefaultQueueLen
	}
	return &Network{
		seed:     cfg.Seed,
		clk:      clock.Or(cfg.Clock),
		log:      cfg.Logger,
		queueLen: q,
		internet: &segment{addrs: map[netip.Addr]attachment{}},
		names:    map[string]bool{},
		pending:  map[*delayed]struct{}{},
	}
}

// Close closes every socket, so blocked reads return, and discards packets still in
// flight. It waits for delayed deliveries already running. Close is idempotent.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	var conns []*conn
	for _, h := range n.hosts {
		for _, c := range h.conns {
			conns = append(conns, c)
		}
		clear(h.conns)
	}
	pending := n.pending
	n.pending = nil
	n.mu.Unlock()

	for _, c := range conns {
		c.shut()
	}
	for d := range pending {
		if d.t.Stop() {
			n.inflight.Done()
		}
	}
	n.inflight.Wait()
	return nil
}

// Stats returns the network-wide packet counters.
func (n *Network) Stats() Stats {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.counts.stats()
}

// AddPublicHost adds a host on the internet with one or more addresses (two, for an
// RFC 5780 server).
func (n *Network) AddPublicHost(name string, addrs ...netip.Addr) *Host {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.addHost(n.internet, name, addrs)
}

// addName reserves a unique element name.
func (n *Network) addName(name string) {
	if name == "" {
		panic("natlab: element needs a name")
	}
	if n.names[name] {
		panic(fmt.Sprintf("natlab: duplicate element name %q", name))
	}
	n.names[name] = true
}

// claim gives addr in s to a. A firewall's LAN addresses are routed to the firewall
// by its parent network, so the claim climbs through firewalls.
func (n *Network) claim(s *segment, addr netip.Addr, a attachment) {
	if !addr.IsValid() || addr.IsUnspecified() {
		panic(fmt.Sprintf("natlab: invalid address %v", addr))
	}
	for {
		if _, taken := s.addrs[addr]; taken {
			panic(fmt.Sprintf("natlab: address %v already in use", addr))
		}
		s.addrs[addr] = a
		if s.owner == nil || !s.owner.firewall {
			return
		}
		a = attachment{nat: s.owner}
		s = s.owner.parent
	}
}

// unclaim undoes claim.
func (n *Network) unclaim(s *segment, addr netip.Addr) {
	for {
		delete(s.addrs, addr)
		if s.owner == nil || !s.owner.firewall {
			return
		}
		s = s.owner.parent
	}
}

// count records e network-wide and, when r is not nil, on r.
func (n *Network) count(r *NAT, e event) {
	n.counts[e]++
	if r != nil {
		r.counts[e]++
	}
}

// drop counts and logs a dropped packet; r is the NAT responsible, if any.
func (n *Network) drop(r *NAT, e event, p packet) {
	n.count(r, e)
	if n.log != nil {
		at := "internet"
		if r != nil {
			at = r.name
		}
		n.log.Debug("natlab: drop", "reason", e.String(), "at", at, "src", p.src, "dst", p.dst)
	}
}

// The forwarding functions below run with n.mu held.

// send forwards a packet a socket on h wrote.
func (n *Network) send(h *Host, p packet) {
	n.count(nil, evSent)
	if h.owns(p.dst.Addr()) {
		n.deliver(h, p)
		return
	}
	n.cross(h.link, nil, p, func(p packet) { n.route(h.seg, p, false) })
}

// route forwards p within s. A packet that came in from s's uplink (fromUplink) is not
// sent back out when nothing in s owns its destination.
func (n *Network) route(s *segment, p packet, fromUplink bool) {
	a := s.addrs[p.dst.Addr()]
	switch {
	case a.host != nil:
		n.cross(a.host.link, nil, p, func(p packet) { n.deliver(a.host, p) })
	case a.nat != nil:
		n.cross(a.nat.uplink, a.nat, p, a.nat.inbound)
	case s.owner != nil && !fromUplink:
		s.owner.outbound(p)
	default:
		n.drop(s.owner, evNoRoute, p)
	}
}

// cross sends p over l, then hands it to next: at once when the link has no delay,
// otherwise from a clock callback. r is the NAT whose uplink l is, if any.
func (n *Network) cross(l *link, r *NAT, p packet, next func(packet)) {
	if l.lose() {
		n.drop(r, evLost, p)
		return
	}
	d := l.delay()
	if d <= 0 {
		next(p)
		return
	}
	n.after(d, func() { next(p) })
}

// after runs f with n.mu held once d has passed, unless the network closes first.
func (n *Network) after(d time.Duration, f func()) {
	if n.closed {
		return
	}
	dl := &delayed{}
	n.pending[dl] = struct{}{}
	n.inflight.Add(1)
	dl.t = n.clk.AfterFunc(d, func() {
		defer n.inflight.Done()
		n.mu.Lock()
		defer n.mu.Unlock()
		if _, ok := n.pending[dl]; !ok {
			return // the network closed
		}
		delete(n.pending, dl)
		f()
	})
}

// deliver queues p on the socket of h bound to its destination.
func (n *Network) deliver(h *Host, p packet) {
	c := h.lookup(p.dst)
	if c == nil {
		n.drop(nil, evNoListener, p)
		return
	}
	if !c.enqueue(p, n.queueLen) {
		n.drop(nil, evQueueFull, p)
		return
	}
	n.count(nil, evDelivered)
}
