package natlab

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"time"

	"peerlink/nat"
)

// DefaultMappingTimeout is a mapping's idle lifetime when NATConfig.MappingTimeout is
// zero: the two minutes RFC 4787 asks of UDP mappings.
const DefaultMappingTimeout = 2 * time.Minute

// The port range PC, RD and collision fallback allocate from.
const (
	minPort  = 1024
	maxPort  = 65535
	portSpan = maxPort - minPort + 1
)

// NATConfig configures a NAT (or, with Firewall, a filtering firewall).
type NATConfig struct {
	// Name identifies the NAT in logs and seeds its randomness. Required, and unique
	// among the network's hosts and NATs.
	Name string
	// Type is the mapping, filtering and allocation policy. A zero (unknown) policy
	// means the typical home router's: endpoint-independent mapping, port-dependent
	// filtering, port preservation.
	Type nat.Type
	// PublicIP is the NAT's address on its parent network: a public address, or for a
	// NAT behind a NAT an address on the parent's LAN (e.g. 100.64.0.2). Required
	// unless Firewall is set, when it must be left zero.
	PublicIP netip.Addr
	// Delta is the step between consecutive ports under AllocationPC; it may be
	// negative. Zero means 1. Ports wrap within 1024-65535; if Delta's steps come back
	// to where they began before visiting every port, allocation moves one port on.
	Delta int
	// MappingTimeout is how long a mapping lives without outbound traffic. Zero means
	// DefaultMappingTimeout; negative means mappings never expire.
	MappingTimeout time.Duration
	// RefreshOnInbound makes admitted inbound packets refresh the mapping too. Off, only
	// outbound packets do, which is all RFC 4787 requires of a NAT.
	RefreshOnInbound bool
	// Hairpin forwards packets sent from inside to the NAT's own public address back
	// inside. Off, they are dropped.
	Hairpin bool
	// Parent is the NAT whose LAN this NAT's public side is on; nil is the internet.
	Parent *NAT
	// Uplink is the link between the NAT and its parent network.
	Uplink Link
	// BlockUDP drops every packet in both directions, like a firewall that allows no UDP.
	BlockUDP bool
	// Firewall makes the element a stateful firewall instead of a NAT: nothing is
	// translated, hosts behind it are reachable at their own addresses from the parent
	// network, and only the Filtering policy (with MappingTimeout and BlockUDP) applies.
	// As behind a NAT, a host port that has sent nothing admits nothing, whatever the
	// filtering. Type.Mapping, Type.Allocation, Delta and Hairpin are ignored.
	Firewall bool
}

// NAT is a router between a parent network and its own LAN.
type NAT struct {
	net       *Network
	name      string
	typ       nat.Type
	delta     int
	timeout   time.Duration // < 0: never
	refreshIn bool
	firewall  bool
	parent    *segment
	lan       *segment

	// Guarded by net.mu.
	publicIP netip.Addr
	hairpin  bool
	blockUDP bool
	uplink   *link
	rng      *rand.Rand // port allocation
	pcNext   int        // next PC candidate
	pcOrbit  int        // where the current run of Delta steps began
	byKey    map[mapKey]*mapping
	byExt    map[netip.AddrPort]*mapping
	counts   counts
}

// mapKey identifies a mapping: the internal endpoint, plus for HD mapping the
// destination IP (port 0) and for PD mapping the destination IP and port.
type mapKey struct {
	internal netip.AddrPort
	remote   netip.AddrPort
}

type mapping struct {
	key      mapKey
	external netip.AddrPort
	last     time.Time // last outbound packet (or admitted inbound with RefreshOnInbound)
	// Filter permissions: when the mapping last sent to each IP and each IP:port.
	permIP map[netip.Addr]time.Time
	permEP map[netip.AddrPort]time.Time
}

// Mapping is a snapshot of one NAT mapping.
type Mapping struct {
	Internal netip.AddrPort
	External netip.AddrPort
	// Remote is the destination the mapping is specific to: invalid under EI mapping,
	// the IP with port 0 under HD, the IP and port under PD.
	Remote netip.AddrPort
	// LastOutbound is when the mapping was last refreshed.
	LastOutbound time.Time
}

// AddNAT adds a NAT (or firewall) to the network.
func (n *Network) AddNAT(cfg NATConfig) *NAT {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.addName(cfg.Name)
	t := cfg.Type
	if t.Mapping == nat.MappingUnknown {
		t.Mapping = nat.MappingEI
	}
	if t.Filtering == nat.FilteringUnknown {
		t.Filtering = nat.FilteringPD
	}
	if t.Allocation == nat.AllocationUnknown {
		t.Allocation = nat.AllocationPP
	}
	if !t.Known() {
		panic(fmt.Sprintf("natlab: NAT %q: invalid type %v", cfg.Name, t))
	}
	delta := cmp.Or(cfg.Delta, 1)
	if delta <= -portSpan || delta >= portSpan {
		panic(fmt.Sprintf("natlab: NAT %q: delta %d out of range", cfg.Name, delta))
	}
	parent := n.internet
	if cfg.Parent != nil {
		if cfg.Parent.net != n {
			panic(fmt.Sprintf("natlab: NAT %q: parent belongs to another network", cfg.Name))
		}
		parent = cfg.Parent.lan
	}
	r := &NAT{
		net:       n,
		name:      cfg.Name,
		typ:       t,
		delta:     delta,
		timeout:   cmp.Or(cfg.MappingTimeout, DefaultMappingTimeout),
		refreshIn: cfg.RefreshOnInbound,
		firewall:  cfg.Firewall,
		parent:    parent,
		hairpin:   cfg.Hairpin,
		blockUDP:  cfg.BlockUDP,
		uplink:    &link{Link: cfg.Uplink, rng: newRand(n.seed, "nat:"+cfg.Name+":link")},
		rng:       newRand(n.seed, "nat:"+cfg.Name+":ports"),
		byKey:     map[mapKey]*mapping{},
		byExt:     map[netip.AddrPort]*mapping{},
	}
	r.lan = &segment{owner: r, addrs: map[netip.Addr]attachment{}}
	r.pcNext = minPort + r.rng.IntN(portSpan)
	r.pcOrbit = r.pcNext
	if cfg.Firewall {
		if cfg.PublicIP.IsValid() {
			panic(fmt.Sprintf("natlab: firewall %q: a firewall has no public address", cfg.Name))
		}
		r.typ.Mapping = nat.MappingEI
	} else {
		if !cfg.PublicIP.IsValid() {
			panic(fmt.Sprintf("natlab: NAT %q: PublicIP is required", cfg.Name))
		}
		r.publicIP = cfg.PublicIP.Unmap()
		n.claim(parent, r.publicIP, attachment{nat: r})
	}
	return r
}

// AddHost adds a host on the NAT's LAN with one or more addresses. There are no
// subnets: any address not already used on the LAN will do, and LANs behind different
// NATs may reuse the same addresses. Behind a firewall the addresses must also be
// unused in the parent network, which routes them to the firewall.
func (r *NAT) AddHost(name string, addrs ...netip.Addr) *Host {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	return r.net.addHost(r.lan, name, addrs)
}

// Name returns the NAT's name.
func (r *NAT) Name() string { return r.name }

// Type returns the NAT's policies, with defaults filled in.
func (r *NAT) Type() nat.Type { return r.typ }

// PublicIP returns the NAT's current address on its parent network (invalid for a
// firewall).
func (r *NAT) PublicIP() netip.Addr {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	return r.publicIP
}

// SetPublicIP moves the NAT to a new public address, as when an ISP reassigns it. All
// mappings are lost; the PC counter carries on.
func (r *NAT) SetPublicIP(ip netip.Addr) {
	if r.firewall {
		panic(fmt.Sprintf("natlab: firewall %q has no public address", r.name))
	}
	n := r.net
	n.mu.Lock()
	defer n.mu.Unlock()
	ip = ip.Unmap()
	if ip == r.publicIP {
		return
	}
	n.unclaim(r.parent, r.publicIP)
	n.claim(r.parent, ip, attachment{nat: r})
	r.publicIP = ip
	r.flush()
}

// Flush forgets every mapping, like a conntrack flush or a NAT reboot. The PC counter
// carries on.
func (r *NAT) Flush() {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	r.flush()
}

func (r *NAT) flush() {
	clear(r.byKey)
	clear(r.byExt)
}

// SetUplink changes the uplink's latency, jitter and loss for packets sent from now on.
func (r *NAT) SetUplink(l Link) {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	r.uplink.Link = l
}

// SetBlockUDP turns the drop-all-UDP firewall on or off.
func (r *NAT) SetBlockUDP(block bool) {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	r.blockUDP = block
}

// SetHairpin turns hairpinning on or off.
func (r *NAT) SetHairpin(on bool) {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	r.hairpin = on
}

// Mappings returns the live mappings, ordered by external address.
func (r *NAT) Mappings() []Mapping {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	now := r.net.clk.Now()
	var out []Mapping
	for _, m := range r.byExt {
		if !r.expired(m.last, now) {
			out = append(out, Mapping{Internal: m.key.internal, External: m.external, Remote: m.key.remote, LastOutbound: m.last})
		}
	}
	slices.SortFunc(out, func(a, b Mapping) int { return a.External.Compare(b.External) })
	return out
}

// Stats returns the counters of what this NAT and its uplink did.
func (r *NAT) Stats() Stats {
	r.net.mu.Lock()
	defer r.net.mu.Unlock()
	return r.counts.stats()
}

// The methods below run with net.mu held.

func (r *NAT) expired(last, now time.Time) bool {
	return r.timeout > 0 && now.Sub(last) >= r.timeout
}

// outbound translates a packet leaving the LAN and forwards it.
func (r *NAT) outbound(p packet) {
	n := r.net
	if r.blockUDP {
		n.drop(r, evBlocked, p)
		return
	}
	now := n.clk.Now()
	m := r.mappingFor(p.src, p.dst, now)
	if m == nil {
		n.drop(r, evNoPort, p)
		return
	}
	m.last = now
	m.permIP[p.dst.Addr()] = now
	m.permEP[p.dst] = now
	p.src = m.external
	n.count(r, evTranslated)
	if !r.firewall && p.dst.Addr() == r.publicIP {
		if !r.hairpin {
			n.drop(r, evNoHairpin, p)
			return
		}
		n.count(r, evHairpinned)
		r.inbound(p)
		return
	}
	n.cross(r.uplink, r, p, func(p packet) { n.route(r.parent, p, false) })
}

// inbound filters a packet arriving at the NAT's public side (or hairpinned) and
// forwards it into the LAN.
func (r *NAT) inbound(p packet) {
	n := r.net
	if r.blockUDP {
		n.drop(r, evBlocked, p)
		return
	}
	now := n.clk.Now()
	m := r.byExt[p.dst]
	switch {
	case m == nil:
		n.drop(r, evNoMapping, p)
		return
	case r.expired(m.last, now):
		r.remove(m)
		n.drop(r, evExpired, p)
		return
	case !r.permits(m, p.src, now):
		n.drop(r, evFiltered, p)
		return
	}
	if r.refreshIn {
		m.last = now
		if _, ok := m.permEP[p.src]; ok {
			m.permEP[p.src] = now
		}
		if _, ok := m.permIP[p.src.Addr()]; ok {
			m.permIP[p.src.Addr()] = now
		}
	}
	p.dst = m.key.internal
	n.count(r, evAdmitted)
	n.route(r.lan, p, true)
}

func (r *NAT) permits(m *mapping, src netip.AddrPort, now time.Time) bool {
	var last time.Time
	var ok bool
	switch r.typ.Filtering {
	case nat.FilteringEI:
		return true
	case nat.FilteringHD:
		last, ok = m.permIP[src.Addr()]
	default:
		last, ok = m.permEP[src]
	}
	return ok && !r.expired(last, now)
}

// mappingFor returns the live mapping for a packet from src to dst, creating it when
// needed; nil when no port is free.
func (r *NAT) mappingFor(src, dst netip.AddrPort, now time.Time) *mapping {
	k := mapKey{internal: src}
	switch r.typ.Mapping {
	case nat.MappingHD:
		k.remote = netip.AddrPortFrom(dst.Addr(), 0)
	case nat.MappingPD:
		k.remote = dst
	}
	if m := r.byKey[k]; m != nil {
		if !r.expired(m.last, now) {
			return m
		}
		r.remove(m)
	}
	ext, ok := r.allocate(src, now)
	if !ok {
		return nil
	}
	m := &mapping{
		key:      k,
		external: ext,
		last:     now,
		permIP:   map[netip.Addr]time.Time{},
		permEP:   map[netip.AddrPort]time.Time{},
	}
	r.byKey[k] = m
	r.byExt[ext] = m
	r.net.count(r, evMappings)
	return m
}

func (r *NAT) remove(m *mapping) {
	delete(r.byKey, m.key)
	delete(r.byExt, m.external)
}

// allocate picks the external address of a new mapping for src.
func (r *NAT) allocate(src netip.AddrPort, now time.Time) (netip.AddrPort, bool) {
	if r.firewall {
		return src, true // one mapping per internal endpoint, so src is never taken
	}
	var port int
	ok := false
	switch r.typ.Allocation {
	case nat.AllocationPP:
		if port = int(src.Port()); r.free(port, now) {
			ok = true
		} else {
			port, ok = r.randomFree(now)
		}
	case nat.AllocationPC:
		// Step past ports in use, as a sequential allocator would; the counter moves
		// either way, so the next mapping still follows the last candidate. When Delta
		// shares a factor with the range its steps return to their start before every
		// port is visited; then move one port on, so all ports are reachable.
		for range portSpan {
			port = r.pcNext
			r.pcNext = stepPort(r.pcNext, r.delta)
			if r.pcNext == r.pcOrbit {
				r.pcNext = stepPort(r.pcNext, 1)
				r.pcOrbit = r.pcNext
			}
			if r.free(port, now) {
				ok = true
				break
			}
		}
	default:
		port, ok = r.randomFree(now)
	}
	return netip.AddrPortFrom(r.publicIP, uint16(port)), ok
}

// stepPort moves port by d within [minPort, maxPort], wrapping around.
func stepPort(port, d int) int {
	return minPort + ((port-minPort+d)%portSpan+portSpan)%portSpan
}

// free reports whether port is unused, reclaiming it from an expired mapping.
func (r *NAT) free(port int, now time.Time) bool {
	m := r.byExt[netip.AddrPortFrom(r.publicIP, uint16(port))]
	if m == nil {
		return true
	}
	if r.expired(m.last, now) {
		r.remove(m)
		return true
	}
	return false
}

// randomFree draws a free port in [minPort, maxPort].
func (r *NAT) randomFree(now time.Time) (int, bool) {
	// Draws find a free port at once unless the NAT is nearly full; then scan.
	for range 16 {
		if p := minPort + r.rng.IntN(portSpan); r.free(p, now) {
			return p, true
		}
	}
	start := r.rng.IntN(portSpan)
	for i := range portSpan {
		if p := minPort + (start+i)%portSpan; r.free(p, now) {
			return p, true
		}
	}
	return 0, false
}
