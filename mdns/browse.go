package mdns

import (
	"context"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"peerlink/clock"
	"peerlink/identity"
)

// Query timing (RFC 6762 §5.2): the first query after 20-120 ms, then intervals that
// double from one second up to an hour.
const (
	firstQueryMin    = 20 * time.Millisecond
	firstQueryMax    = 120 * time.Millisecond
	maxQueryInterval = time.Hour
	// goodbyeGrace is how long a record said goodbye to lingers (RFC 6762 §10.1), so
	// that a goodbye immediately contradicted by a fresh answer does no harm.
	goodbyeGrace = time.Second
	// maxResolveInterval caps the backoff of queries for missing SRV, TXT or addresses.
	maxResolveInterval = time.Minute
	// maxCacheTTL caps how long a record is believed, whatever TTL it claims, so a
	// peer that vanished is forgotten within a day.
	maxCacheTTL = 24 * time.Hour
)

// refreshAt are the fractions of a record's lifetime at which the browser asks for it
// again (RFC 6762 §5.2), each with up to 2% of jitter.
var refreshAt = []float64{0.80, 0.85, 0.90, 0.95}

// cached is one record in the browser's cache.
type cached struct {
	rec      record
	received time.Time
	expires  time.Time
	lifetime time.Duration
	// refreshes is how many refresh queries were sent; refreshDue the next one's time.
	refreshes  int
	refreshDue time.Time
}

func newCached(r record, now time.Time) *cached {
	c := &cached{rec: r, received: now}
	if r.TTL == 0 {
		c.expires = now.Add(goodbyeGrace)
		c.refreshes = len(refreshAt)
		return c
	}
	c.lifetime = min(time.Duration(r.TTL)*time.Second, maxCacheTTL)
	c.expires = now.Add(c.lifetime)
	c.setRefresh()
	return c
}

func (c *cached) setRefresh() {
	if c.refreshes >= len(refreshAt) {
		c.refreshDue = time.Time{}
		return
	}
	f := refreshAt[c.refreshes] + float64(jitter(0, 20))/1000
	c.refreshDue = c.received.Add(time.Duration(float64(c.lifetime) * f))
}

// remaining returns the record's TTL as of now, in seconds.
func (c *cached) remaining(now time.Time) uint32 {
	if !now.Before(c.expires) {
		return 0
	}
	return uint32(c.expires.Sub(now) / time.Second)
}

// instance is what the browser knows of one service instance.
type instance struct {
	name string
	ptr  *cached
	srv  *cached
	txt  *cached
	ifc  string
	// last is the peer as last reported; nil while not reported (or after Lost).
	last *Peer
	// resolveDue and resolveGap pace queries for whatever is missing.
	resolveDue time.Time
	resolveGap time.Duration
}

// Browser finds peerlink nodes on the link: it queries for the service, keeps a cache
// of the answers (and of everything advertisers announce), and reports peers as they
// appear, change and go.
type Browser struct {
	cfg   Config
	log   *slog.Logger
	clk   clock.Clock
	t     *transport
	sched *scheduler

	mu          sync.Mutex
	closed      bool
	instances   map[string]*instance // by lower-case instance name
	hosts       map[string]map[netip.Addr]*cached
	queryDue    time.Time
	queryGap    time.Duration
	maintainAt  time.Time // when the pending maintenance runs; zero if none
	queue       []Event
	changed     chan struct{} // closed and replaced on every change, for Lookup
	notify      chan struct{}
	done        chan struct{}
	events      chan Event
	pumpDone    chan struct{}
	closeOnce   sync.Once
	sendQueries func(qs []question, known []record) // replaced by tests without sockets
}

// Browse opens the multicast sockets (in the calling goroutine, so inside whatever
// network namespace its thread is in) and starts looking for peers. ctx bounds only the
// start; the browser runs until Close.
func Browse(ctx context.Context, cfg Config) (*Browser, error) {
	b := newBrowser(cfg)
	t, err := openTransport(ctx, &b.cfg, b.handle)
	if err != nil {
		b.sched.close()
		return nil, err
	}
	b.t = t
	b.sendQueries = b.multicastQueries
	b.start()
	return b, nil
}

func newBrowser(cfg Config) *Browser {
	b := &Browser{
		cfg:       cfg,
		log:       cfg.log(),
		clk:       clock.Or(cfg.Clock),
		sched:     newScheduler(cfg.Clock),
		instances: map[string]*instance{},
		hosts:     map[string]map[netip.Addr]*cached{},
		changed:   make(chan struct{}),
		notify:    make(chan struct{}, 1),
		done:      make(chan struct{}),
		events:    make(chan Event),
		pumpDone:  make(chan struct{}),
	}
	return b
}

func (b *Browser) start() {
	go b.pump()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.queryDue = b.clk.Now().Add(jitter(firstQueryMin, firstQueryMax))
	b.queryGap = time.Second
	b.rescheduleLocked()
}

// Events returns the channel of peer events. It is closed by Close. Events are queued
// without bound, so a slow reader delays nothing but itself.
func (b *Browser) Events() <-chan Event { return b.events }

// Peers returns the peers known now, sorted by NodeID.
func (b *Browser) Peers() []Peer {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.peersLocked()
}

func (b *Browser) peersLocked() []Peer {
	var out []Peer
	for _, in := range b.instances {
		if in.last != nil {
			out = append(out, *in.last)
		}
	}
	slices.SortFunc(out, func(x, y Peer) int { return strings.Compare(x.NodeID.String(), y.NodeID.String()) })
	return out
}

// Lookup waits until a peer with the given NodeID is known and returns it. It returns
// ctx's error if ctx ends first and ErrClosed if the browser is closed.
func (b *Browser) Lookup(ctx context.Context, id identity.NodeID) (Peer, error) {
	for {
		b.mu.Lock()
		for _, p := range b.peersLocked() {
			if p.NodeID == id {
				b.mu.Unlock()
				return p, nil
			}
		}
		ch, closed := b.changed, b.closed
		b.mu.Unlock()
		if closed {
			return Peer{}, ErrClosed
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return Peer{}, ctx.Err()
		case <-b.done:
			return Peer{}, ErrClosed
		}
	}
}

// pump hands queued events to the channel.
func (b *Browser) pump() {
	defer close(b.pumpDone)
	defer close(b.events)
	for {
		b.mu.Lock()
		q := b.queue
		b.queue = nil
		b.mu.Unlock()
		for _, ev := range q {
			select {
			case b.events <- ev:
			case <-b.done:
				return
			}
		}
		select {
		case <-b.notify:
		case <-b.done:
			return
		}
	}
}

func (b *Browser) handle(pk *packet, _ netip.AddrPort, ifc *iface) {
	if !pk.Response {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.absorbLocked(pk, ifc.Name, b.clk.Now())
	b.updateLocked()
}

// absorbLocked puts a response's records of peerlink services into the cache.
func (b *Browser) absorbLocked(pk *packet, ifName string, now time.Time) {
	all := append(slices.Clone(pk.Answers), pk.Extra...)
	// PTR first, then SRV and TXT, then addresses, so a response carrying all of them
	// in any order is understood in one pass.
	order := []dnsmessage.Type{dnsmessage.TypePTR, dnsmessage.TypeSRV, dnsmessage.TypeTXT, dnsmessage.TypeA, dnsmessage.TypeAAAA}
	for _, typ := range order {
		for _, r := range all {
			if r.Type != typ {
				continue
			}
			switch typ {
			case dnsmessage.TypePTR:
				if !nameEqual(r.Name, serviceName()) || !isInstanceName(r.Target) {
					continue
				}
				in := b.instanceLocked(r.Target, r.TTL > 0)
				if in == nil {
					continue
				}
				in.ptr = newCached(r, now)
				in.ifc = ifName
			case dnsmessage.TypeSRV, dnsmessage.TypeTXT:
				if !isInstanceName(r.Name) {
					continue
				}
				in := b.instanceLocked(r.Name, r.TTL > 0)
				if in == nil {
					continue
				}
				if typ == dnsmessage.TypeSRV {
					in.srv = newCached(r, now)
				} else {
					in.txt = newCached(r, now)
				}
				in.ifc = ifName
			case dnsmessage.TypeA, dnsmessage.TypeAAAA:
				key := strings.ToLower(r.Name)
				if !b.wantedHostLocked(key) {
					continue
				}
				if r.Addr.Is6() && r.Addr.IsLinkLocalUnicast() {
					r.Addr = r.Addr.WithZone(ifName)
				}
				set := b.hosts[key]
				if set == nil {
					set = map[netip.Addr]*cached{}
					b.hosts[key] = set
				}
				if r.Flush {
					// RFC 6762 §10.2: the record set replaces what is older than a second.
					for _, c := range set {
						if c.rec.Type == r.Type && now.Sub(c.received) > time.Second && c.expires.After(now.Add(goodbyeGrace)) {
							c.expires = now.Add(goodbyeGrace)
							c.refreshes = len(refreshAt)
							c.refreshDue = time.Time{}
						}
					}
				}
				if r.TTL == 0 && set[r.Addr] == nil {
					continue
				}
				set[r.Addr] = newCached(r, now)
			}
		}
	}
}

// isInstanceName reports whether name is "<label>._peerlink._udp.local.".
func isInstanceName(name string) bool {
	l, rest := firstLabel(name)
	return l != "" && nameEqual(rest, serviceName())
}

// instanceLocked returns the instance, creating it when create is set.
func (b *Browser) instanceLocked(name string, create bool) *instance {
	key := strings.ToLower(name)
	in := b.instances[key]
	if in == nil && create {
		in = &instance{name: name}
		b.instances[key] = in
	}
	return in
}

func (b *Browser) wantedHostLocked(host string) bool {
	for _, in := range b.instances {
		if in.srv != nil && strings.EqualFold(in.srv.rec.Target, host) {
			return true
		}
	}
	return false
}

// peerOf builds the instance's peer from live records; ok is false while incomplete.
func (b *Browser) peerOf(in *instance, now time.Time) (Peer, bool) {
	live := func(c *cached) bool { return c != nil && now.Before(c.expires) }
	if !live(in.ptr) || !live(in.srv) || !live(in.txt) {
		return Peer{}, false
	}
	txt := parseTXT(in.txt.rec.TXT)
	id, err := identity.ParseNodeID(txt[KeyNode])
	if err != nil {
		label, _ := firstLabel(in.name)
		if id, err = identity.ParseNodeID(label); err != nil {
			return Peer{}, false
		}
	}
	p := Peer{
		NodeID:    id,
		Instance:  in.name,
		Host:      in.srv.rec.Target,
		Port:      in.srv.rec.Port,
		TXT:       txt,
		Profile:   txt[KeyProfile],
		Interface: in.ifc,
	}
	for a, c := range b.hosts[strings.ToLower(p.Host)] {
		if live(c) {
			p.Addrs = append(p.Addrs, a)
		}
	}
	if len(p.Addrs) == 0 || p.Port == 0 {
		return Peer{}, false
	}
	slices.SortFunc(p.Addrs, func(x, y netip.Addr) int {
		if x.Is4() != y.Is4() {
			if x.Is4() {
				return -1
			}
			return 1
		}
		return x.Compare(y)
	})
	return p, true
}

func samePeer(x, y Peer) bool {
	return x.NodeID == y.NodeID && x.Instance == y.Instance && x.Host == y.Host && x.Port == y.Port &&
		slices.Equal(x.Addrs, y.Addrs) && maps.Equal(x.TXT, y.TXT)
}

// updateLocked drops what expired, emits events for what changed and reschedules.
func (b *Browser) updateLocked() {
	now := b.clk.Now()
	changed := false
	for key, in := range b.instances {
		p, ok := b.peerOf(in, now)
		switch {
		case ok && in.last == nil:
			b.emitLocked(Event{Kind: Found, Peer: p})
			in.last, changed = &p, true
		case ok && !samePeer(p, *in.last):
			b.emitLocked(Event{Kind: Updated, Peer: p})
			in.last, changed = &p, true
		case ok:
			in.last.Interface = p.Interface
		case in.last != nil:
			b.emitLocked(Event{Kind: Lost, Peer: *in.last})
			in.last, changed = nil, true
		}
		if in.ptr == nil || !now.Before(in.ptr.expires) {
			if in.srv == nil || !now.Before(in.srv.expires) {
				delete(b.instances, key)
			}
		}
	}
	for host, set := range b.hosts {
		for a, c := range set {
			if !now.Before(c.expires) {
				delete(set, a)
			}
		}
		if len(set) == 0 || !b.wantedHostLocked(host) {
			delete(b.hosts, host)
		}
	}
	if changed {
		close(b.changed)
		b.changed = make(chan struct{})
	}
	b.rescheduleLocked()
}

func (b *Browser) emitLocked(ev Event) {
	b.log.Debug("mdns: peer "+ev.Kind.String(), "node", ev.Peer.NodeID.Short(), "addrs", ev.Peer.Addrs, "port", ev.Peer.Port)
	b.queue = append(b.queue, ev)
	select {
	case b.notify <- struct{}{}:
	default:
	}
}

// nextDeadlineLocked is the earliest time anything needs doing.
// Times already past are left out: maintain has dealt with them, and one it could not
// act on must not make it spin.
func (b *Browser) nextDeadlineLocked(now time.Time) time.Time {
	var next time.Time
	consider := func(t time.Time) {
		if t.After(now) && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	each := func(c *cached) {
		if c != nil {
			consider(c.expires)
			consider(c.refreshDue)
		}
	}
	consider(b.queryDue)
	for _, in := range b.instances {
		each(in.ptr)
		each(in.srv)
		each(in.txt)
		if in.ptr != nil && in.last == nil {
			consider(in.resolveDue)
		}
	}
	for _, set := range b.hosts {
		for _, c := range set {
			each(c)
		}
	}
	return next
}

func (b *Browser) rescheduleLocked() {
	if b.closed {
		return
	}
	now := b.clk.Now()
	next := b.nextDeadlineLocked(now)
	if next.IsZero() || (!b.maintainAt.IsZero() && !next.Before(b.maintainAt)) {
		return
	}
	b.maintainAt = next
	b.sched.after(next.Sub(now), b.maintain)
}

// maintain sends the queries that are due and expires what is old.
func (b *Browser) maintain() {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	now := b.clk.Now()
	if !b.maintainAt.After(now) {
		b.maintainAt = time.Time{}
	}
	var qs []question
	ask := func(name string, typ dnsmessage.Type) {
		q := question{Name: name, Type: typ}
		if !slices.Contains(qs, q) {
			qs = append(qs, q)
		}
	}
	refresh := func(c *cached, name string, typ dnsmessage.Type) {
		if c == nil || c.refreshDue.IsZero() || now.Before(c.refreshDue) {
			return
		}
		ask(name, typ)
		c.refreshes++
		c.setRefresh()
	}
	if !b.queryDue.IsZero() && !now.Before(b.queryDue) {
		ask(serviceName(), dnsmessage.TypePTR)
		b.queryDue = now.Add(b.queryGap)
		b.queryGap = min(2*b.queryGap, maxQueryInterval)
	}
	for _, in := range b.instances {
		refresh(in.ptr, serviceName(), dnsmessage.TypePTR)
		refresh(in.srv, in.name, dnsmessage.TypeSRV)
		refresh(in.txt, in.name, dnsmessage.TypeTXT)
		if in.srv != nil {
			for _, c := range b.hosts[strings.ToLower(in.srv.rec.Target)] {
				refresh(c, in.srv.rec.Target, c.rec.Type)
			}
		}
		// An instance whose PTR is known but whose peer is incomplete: ask for the rest,
		// backing off, as not every responder sends it all with the PTR.
		if in.ptr != nil && in.last == nil && now.Before(in.ptr.expires) {
			if in.resolveDue.IsZero() {
				in.resolveDue, in.resolveGap = now.Add(firstQueryMax), time.Second
			} else if !now.Before(in.resolveDue) {
				if in.srv == nil {
					ask(in.name, dnsmessage.TypeSRV)
				}
				if in.txt == nil {
					ask(in.name, dnsmessage.TypeTXT)
				}
				if in.srv != nil {
					ask(in.srv.rec.Target, dnsmessage.TypeA)
					ask(in.srv.rec.Target, dnsmessage.TypeAAAA)
				}
				in.resolveDue = now.Add(in.resolveGap)
				in.resolveGap = min(2*in.resolveGap, maxResolveInterval)
			}
		}
	}
	var known []record
	if slices.ContainsFunc(qs, func(q question) bool { return nameEqual(q.Name, serviceName()) }) {
		// Known-answer suppression (RFC 6762 §7.1): list PTRs with over half their life.
		for _, in := range b.instances {
			if c := in.ptr; c != nil && c.lifetime > 0 && c.expires.Sub(now) > c.lifetime/2 {
				r := c.rec
				r.TTL = c.remaining(now)
				known = append(known, r)
			}
		}
	}
	b.updateLocked()
	send := b.sendQueries
	b.mu.Unlock()
	if len(qs) > 0 {
		send(qs, known)
	}
}

func (b *Browser) multicastQueries(qs []question, known []record) {
	pk := &packet{Questions: qs, Answers: known}
	buf, err := pk.encode()
	if err != nil {
		b.log.Warn("mdns: building query", "err", err)
		return
	}
	for _, ifc := range b.t.order {
		if err := b.t.multicast(buf, ifc); err != nil {
			b.log.Debug("mdns: sending query", "interface", ifc.Name, "err", err)
		}
	}
}

// Close stops browsing, closes the Events channel and waits for the browser's
// goroutines. It is idempotent.
func (b *Browser) Close() error {
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.closed = true
		b.mu.Unlock()
		close(b.done)
		b.sched.close()
		if b.t != nil {
			b.t.close()
		}
		<-b.pumpDone
	})
	return nil
}
