package natlab_test

import (
	"bytes"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/nat"
	"peerlink/natlab"
)

var (
	eiEIpp = nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringEI, Allocation: nat.AllocationPP}
	eiPDpp = nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP}
	eiPDpc = nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPC}
)

// TestMappingTimeout drives mappings and their filter permissions through expiry on a
// fake clock.
func TestMappingTimeout(t *testing.T) {
	type env struct {
		n      *natlab.Network
		clk    *clock.Fake
		r      *natlab.NAT
		s      net.PacketConn
		x, y   net.PacketConn
		extX   netip.AddrPort
		reachX func() bool // x sends to extX; reports whether it arrived
	}
	setup := func(t *testing.T, cfg natlab.NATConfig) *env {
		clk := clock.NewFake(time.Unix(1_700_000_000, 0))
		n := natlab.New(natlab.Config{Seed: 3, Clock: clk})
		t.Cleanup(func() { n.Close() })
		cfg.Name, cfg.PublicIP = "nat", natA
		r := n.AddNAT(cfg)
		e := &env{n: n, clk: clk, r: r}
		e.s = listen(t, r.AddHost("inside", lanA), ":4000")
		e.x = listen(t, n.AddPublicHost("x", pubX), ":3478")
		e.y = listen(t, n.AddPublicHost("y", pubY), ":3478")
		send(t, e.s, at(pubX, 3478), "open")
		_, e.extX = readQueued(t, e.x)
		e.reachX = func() bool {
			got := delivered(n, func() { send(t, e.x, e.extX, "in") }) == 1
			if got {
				readQueued(t, e.s)
			}
			return got
		}
		return e
	}

	t.Run("inbound does not refresh", func(t *testing.T) {
		e := setup(t, natlab.NATConfig{Type: eiPDpc, MappingTimeout: 30 * time.Second})
		e.clk.Advance(29 * time.Second)
		if !e.reachX() {
			t.Fatal("mapping dead before its timeout")
		}
		e.clk.Advance(time.Second) // 30 s after the last outbound packet
		if e.reachX() {
			t.Fatal("mapping alive 30 s after the last outbound packet; inbound must not refresh it")
		}
		if st := e.r.Stats(); st.Expired != 1 {
			t.Errorf("Expired = %d, want 1", st.Expired)
		}
		if m := e.r.Mappings(); len(m) != 0 {
			t.Errorf("expired mapping still listed: %v", m)
		}
		// Sending again makes a new mapping: under PC it takes the next port.
		send(t, e.s, at(pubX, 3478), "again")
		_, ext := readQueued(t, e.x)
		if ext.Port() != e.extX.Port()+1 {
			t.Errorf("new mapping on port %d, want %d (next PC port)", ext.Port(), e.extX.Port()+1)
		}
	})

	t.Run("outbound refreshes", func(t *testing.T) {
		e := setup(t, natlab.NATConfig{Type: eiPDpc, MappingTimeout: 30 * time.Second})
		for range 5 {
			e.clk.Advance(20 * time.Second)
			send(t, e.s, at(pubX, 3478), "keepalive")
			readQueued(t, e.x)
		}
		e.clk.Advance(29 * time.Second)
		if !e.reachX() {
			t.Fatal("mapping kept alive by outbound packets expired")
		}
		if st := e.r.Stats(); st.Mappings != 1 {
			t.Errorf("Mappings = %d, want 1 (one mapping refreshed, not recreated)", st.Mappings)
		}
	})

	t.Run("RefreshOnInbound", func(t *testing.T) {
		e := setup(t, natlab.NATConfig{Type: eiPDpc, MappingTimeout: 30 * time.Second, RefreshOnInbound: true})
		for range 5 {
			e.clk.Advance(20 * time.Second)
			if !e.reachX() {
				t.Fatal("mapping refreshed by inbound packets expired")
			}
		}
	})

	t.Run("permissions expire on their own", func(t *testing.T) {
		e := setup(t, natlab.NATConfig{Type: eiPDpp, MappingTimeout: 30 * time.Second})
		e.clk.Advance(20 * time.Second)
		send(t, e.s, at(pubY, 3478), "to y") // refreshes the mapping, not x's permission
		readQueued(t, e.y)
		e.clk.Advance(15 * time.Second) // 35 s after x was contacted, 15 s after y
		if e.reachX() {
			t.Error("x admitted 35 s after it was last contacted")
		}
		if got := delivered(e.n, func() { send(t, e.y, e.extX, "from y") }); got != 1 {
			t.Error("y not admitted 15 s after it was contacted")
		}
		if st := e.r.Stats(); st.Filtered != 1 || st.Expired != 0 {
			t.Errorf("Filtered %d, Expired %d; want 1 and 0", st.Filtered, st.Expired)
		}
	})

	t.Run("default is two minutes", func(t *testing.T) {
		e := setup(t, natlab.NATConfig{Type: eiEIpp})
		e.clk.Advance(natlab.DefaultMappingTimeout - time.Second)
		if !e.reachX() {
			t.Fatal("mapping dead before the default timeout")
		}
		e.clk.Advance(time.Second)
		if e.reachX() {
			t.Fatal("mapping alive at the default timeout")
		}
	})

	t.Run("negative never expires", func(t *testing.T) {
		e := setup(t, natlab.NATConfig{Type: eiEIpp, MappingTimeout: -1})
		e.clk.Advance(1000 * time.Hour)
		if !e.reachX() {
			t.Fatal("mapping with negative timeout expired")
		}
	})
}

// TestHairpin sends from one inside host to another's external address.
func TestHairpin(t *testing.T) {
	cases := []struct {
		name    string
		typ     nat.Type
		hairpin bool
	}{
		{"on", eiEIpp, true},
		{"off", eiEIpp, false},
		{"on, port-dependent filtering", eiPDpp, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := newPolicyLab(t, natlab.NATConfig{Type: c.typ, Hairpin: c.hairpin})
			x1 := listen(t, l.x, ":3478")
			a := listen(t, l.inside, ":0")
			b := listen(t, l.r.AddHost("b", lanA2), ":0")
			send(t, a, at(pubX, 3478), "who am i")
			_, extA := recv(t, x1)
			send(t, b, at(pubX, 3478), "who am i")
			_, extB := recv(t, x1)

			got := delivered(l.n, func() { send(t, a, extB, "hello b") })
			st := l.r.Stats()
			switch {
			case !c.hairpin:
				if got != 0 {
					t.Error("hairpin off, yet delivered")
				}
				if st.NoHairpin != 1 {
					t.Errorf("NoHairpin = %d, want 1", st.NoHairpin)
				}
				l.r.SetHairpin(true)
				send(t, a, extB, "hello b")
				if msg, _ := recv(t, b); msg != "hello b" {
					t.Errorf("after SetHairpin(true) b got %q", msg)
				}
				return
			case c.typ.Filtering == nat.FilteringPD:
				// The hairpinned packet meets b's filter, which has only seen x.
				if got != 0 {
					t.Error("delivered although b never sent to a")
				}
				if st.Filtered != 1 {
					t.Errorf("Filtered = %d, want 1", st.Filtered)
				}
				send(t, b, extA, "hello a") // opens b's filter to a; a's is open to b
				if msg, from := recv(t, a); msg != "hello a" || from != extB {
					t.Errorf("a got %q from %v, want \"hello a\" from %v", msg, from, extB)
				}
				send(t, a, extB, "hello b")
			}
			msg, from := recv(t, b)
			if msg != "hello b" || from != extA {
				t.Errorf("b got %q from %v, want \"hello b\" from a's external %v", msg, from, extA)
			}
			if st := l.r.Stats(); st.Hairpinned == 0 {
				t.Error("Hairpinned not counted")
			}
		})
	}
}

// TestCGNAT checks double translation through a home NAT behind a carrier-grade NAT,
// and traffic between two customers of the same carrier.
func TestCGNAT(t *testing.T) {
	n := natlab.New(natlab.Config{Seed: 5})
	defer n.Close()
	cg := n.AddNAT(natlab.NATConfig{Name: "carrier", Type: eiEIpp, PublicIP: natA, Hairpin: true})
	home1 := n.AddNAT(natlab.NATConfig{Name: "home1", Type: eiEIpp, PublicIP: netip.MustParseAddr("100.64.0.2"), Parent: cg})
	home2 := n.AddNAT(natlab.NATConfig{Name: "home2", Type: eiEIpp, PublicIP: netip.MustParseAddr("100.64.0.3"), Parent: cg})
	x1 := listen(t, n.AddPublicHost("x", pubX), ":3478")
	// Both homes use the same private address, as real homes do.
	s1 := listen(t, home1.AddHost("laptop1", lanA), ":4000")
	s2 := listen(t, home2.AddHost("laptop2", lanA), ":4000")

	send(t, s1, at(pubX, 3478), "one")
	_, ext1 := recv(t, x1)
	send(t, s2, at(pubX, 3478), "two")
	_, ext2 := recv(t, x1)
	if ext1.Addr() != natA || ext2.Addr() != natA || ext1 == ext2 {
		t.Fatalf("x saw %v and %v, want two ports of the carrier's %v", ext1, ext2, natA)
	}

	m1, mc := home1.Mappings(), cg.Mappings()
	if len(m1) != 1 || m1[0].Internal != at(lanA, 4000) || m1[0].External != at(netip.MustParseAddr("100.64.0.2"), 4000) {
		t.Errorf("home1 mappings %v, want 192.168.1.2:4000 -> 100.64.0.2:4000", m1)
	}
	if len(mc) != 2 || mc[0].Internal != m1[0].External || mc[0].External != ext1 {
		t.Errorf("carrier mappings %v, want first 100.64.0.2:4000 -> %v", mc, ext1)
	}

	send(t, x1, ext1, "reply")
	if msg, from := recv(t, s1); msg != "reply" || from != at(pubX, 3478) {
		t.Errorf("laptop1 got %q from %v", msg, from)
	}
	for _, r := range []*natlab.NAT{home1, cg} {
		if st := r.Stats(); st.Admitted != 1 {
			t.Errorf("%s admitted %d packets, want 1", r.Name(), st.Admitted)
		}
	}

	// Customer to customer through the carrier's public address: hairpinned there.
	send(t, s1, ext2, "via hairpin")
	if msg, from := recv(t, s2); msg != "via hairpin" || from != ext1 {
		t.Errorf("laptop2 got %q from %v, want from %v", msg, from, ext1)
	}
	if st := cg.Stats(); st.Hairpinned != 1 {
		t.Errorf("carrier hairpinned %d, want 1", st.Hairpinned)
	}

	// And directly across the carrier's LAN, translated only by the home NATs.
	send(t, s1, home2.Mappings()[0].External, "via carrier LAN")
	if msg, from := recv(t, s2); msg != "via carrier LAN" || from != m1[0].External {
		t.Errorf("laptop2 got %q from %v, want from %v", msg, from, m1[0].External)
	}

	// The home NAT moves; the carrier's mapping still points at its old address. A
	// packet admitted by the carrier finds nothing there and must die in the carrier's
	// LAN, not be sent back out.
	home1.SetPublicIP(netip.MustParseAddr("100.64.0.9"))
	before := cg.Stats()
	expectDropped(t, n, "to the home NAT's old address", func() { send(t, x1, ext1, "stale") })
	after := cg.Stats()
	if after.Admitted != before.Admitted+1 || after.NoRoute != before.NoRoute+1 || after.Translated != before.Translated {
		t.Errorf("carrier stats went from %+v to %+v; want one more admitted and one more no-route, nothing translated", before, after)
	}
}

// TestFirewall checks a non-translating firewall in front of a public host.
func TestFirewall(t *testing.T) {
	l := newPolicyLab(t, natlab.NATConfig{Firewall: true, Type: nat.Type{Filtering: nat.FilteringPD}})
	server := l.r.AddHost("server", netip.MustParseAddr("203.0.113.50"))
	s := listen(t, server, ":4000")
	x1 := listen(t, l.x, ":3478")
	y1 := listen(t, l.y, ":3478")

	expectDropped(t, l.n, "unsolicited", func() { send(t, y1, at(server.Addr(), 4000), "unsolicited") })
	send(t, s, at(pubX, 3478), "out")
	if _, from := recv(t, x1); from != at(server.Addr(), 4000) {
		t.Errorf("x saw %v, want the untranslated %v", from, at(server.Addr(), 4000))
	}
	send(t, x1, at(server.Addr(), 4000), "reply")
	if msg, _ := recv(t, s); msg != "reply" {
		t.Errorf("got %q", msg)
	}
	expectDropped(t, l.n, "port-dependent filter", func() { send(t, y1, at(server.Addr(), 4000), "other host") })
	if st := l.r.Stats(); st.NoMapping != 1 || st.Filtered != 1 {
		t.Errorf("NoMapping %d, Filtered %d; want 1 and 1", st.NoMapping, st.Filtered)
	}
}

// TestBlockUDP checks the drop-all firewall on a NAT and on a plain firewall.
func TestBlockUDP(t *testing.T) {
	for _, firewall := range []bool{false, true} {
		name := "NAT"
		if firewall {
			name = "firewall"
		}
		t.Run(name, func(t *testing.T) {
			l := newPolicyLab(t, natlab.NATConfig{Type: eiEIpp, Firewall: firewall, BlockUDP: true})
			x1 := listen(t, l.x, ":3478")
			s := listen(t, l.inside, ":4000")
			expectDropped(t, l.n, "outbound through BlockUDP", func() { send(t, s, at(pubX, 3478), "blocked") })
			if st := l.r.Stats(); st.Blocked != 1 {
				t.Errorf("Blocked = %d, want 1", st.Blocked)
			}

			l.r.SetBlockUDP(false)
			send(t, s, at(pubX, 3478), "open")
			_, ext := recv(t, x1)
			send(t, x1, ext, "in")
			recv(t, s)

			l.r.SetBlockUDP(true)
			expectDropped(t, l.n, "inbound through BlockUDP", func() { send(t, x1, ext, "in again") })
			if st := l.r.Stats(); st.Blocked != 2 {
				t.Errorf("Blocked = %d, want 2", st.Blocked)
			}
		})
	}
}

// TestFlushAndSetPublicIP simulates a NAT reboot and an address change.
func TestFlushAndSetPublicIP(t *testing.T) {
	l := newPolicyLab(t, natlab.NATConfig{Type: eiEIpp})
	x1 := listen(t, l.x, ":3478")
	s := listen(t, l.inside, ":4000")
	send(t, s, at(pubX, 3478), "open")
	_, ext := recv(t, x1)

	l.r.Flush()
	if m := l.r.Mappings(); len(m) != 0 {
		t.Fatalf("mappings after Flush: %v", m)
	}
	expectDropped(t, l.n, "after flush", func() { send(t, x1, ext, "after flush") })
	if st := l.r.Stats(); st.NoMapping != 1 {
		t.Errorf("NoMapping = %d, want 1", st.NoMapping)
	}

	moved := netip.MustParseAddr("198.51.100.99")
	l.r.SetPublicIP(moved)
	if got := l.r.PublicIP(); got != moved {
		t.Errorf("PublicIP = %v", got)
	}
	send(t, s, at(pubX, 3478), "from new address")
	if _, from := recv(t, x1); from != at(moved, 4000) {
		t.Errorf("x saw %v, want %v", from, at(moved, 4000))
	}
	send(t, x1, ext, "to old address")
	if st := l.n.Stats(); st.NoRoute != 1 {
		t.Errorf("NoRoute = %d, want 1 (old address unowned)", st.NoRoute)
	}
}

// TestRouting checks what is and is not routable.
func TestRouting(t *testing.T) {
	n := natlab.New(natlab.Config{Seed: 1})
	defer n.Close()
	r1 := n.AddNAT(natlab.NATConfig{Name: "r1", Type: eiEIpp, PublicIP: natA})
	r2 := n.AddNAT(natlab.NATConfig{Name: "r2", Type: eiEIpp, PublicIP: natB})
	a := listen(t, r1.AddHost("a", lanA), ":4000")
	neighbour := listen(t, r1.AddHost("neighbour", lanA2), ":4000")
	listen(t, r2.AddHost("far", netip.MustParseAddr("192.168.2.2")), ":4000")

	expectDropped(t, n, "private address on another LAN", func() {
		send(t, a, at(netip.MustParseAddr("192.168.2.2"), 4000), "to another LAN")
	})
	expectDropped(t, n, "unowned public address", func() {
		send(t, a, at(netip.MustParseAddr("203.0.113.99"), 4000), "to nobody")
	})
	if st := n.Stats(); st.NoRoute != 2 {
		t.Errorf("NoRoute = %d, want 2", st.NoRoute)
	}

	before := r1.Stats().Translated
	send(t, a, at(lanA2, 4000), "same LAN")
	if msg, from := recv(t, neighbour); msg != "same LAN" || from != at(lanA, 4000) {
		t.Errorf("neighbour got %q from %v, want untranslated %v", msg, from, at(lanA, 4000))
	}
	if got := r1.Stats().Translated - before; got != 0 {
		t.Errorf("r1 translated %d packets within its own LAN", got)
	}

	send(t, a, at(lanA, 4001), "no listener")
	if st := n.Stats(); st.NoListener != 1 {
		t.Errorf("NoListener = %d, want 1", st.NoListener)
	}
}

// TestPortReclaim: an expired mapping's port is free again for a new one.
func TestPortReclaim(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	n := natlab.New(natlab.Config{Clock: clk})
	defer n.Close()
	r := n.AddNAT(natlab.NATConfig{Name: "nat", Type: eiPDpp, PublicIP: natA, MappingTimeout: 30 * time.Second})
	x1 := listen(t, n.AddPublicHost("x", pubX), ":3478")
	a := listen(t, r.AddHost("a", lanA), ":5000")
	b := listen(t, r.AddHost("b", lanA2), ":5000")
	send(t, a, at(pubX, 3478), "a")
	if _, from := readQueued(t, x1); from.Port() != 5000 {
		t.Fatalf("a mapped to %v, want port 5000", from)
	}
	clk.Advance(30 * time.Second)
	send(t, b, at(pubX, 3478), "b")
	if _, from := readQueued(t, x1); from.Port() != 5000 {
		t.Errorf("b mapped to %v after a's mapping expired, want port 5000", from)
	}
}

// TestPortExhaustion fills every port of a NAT and checks that the next mapping is
// refused rather than doubled up: PC steps past ports in use, RD probes for free ones.
func TestPortExhaustion(t *testing.T) {
	for _, alloc := range []nat.Allocation{nat.AllocationPC, nat.AllocationRD} {
		t.Run(alloc.String(), func(t *testing.T) {
			if alloc == nat.AllocationRD && testing.Short() {
				t.Skip("random probing of a nearly full NAT takes seconds under -race")
			}
			n := natlab.New(natlab.Config{})
			defer n.Close()
			r := n.AddNAT(natlab.NATConfig{Name: "nat", PublicIP: natA, Delta: 7,
				Type: nat.Type{Mapping: nat.MappingPD, Filtering: nat.FilteringPD, Allocation: alloc}})
			s := listen(t, r.AddHost("inside", lanA), ":4000")
			const ports = 65535 - 1024 + 1
			for i := range ports + 1 {
				dst := at(pubX, uint16(1+i%65535)) // a new destination, so a new mapping, each time
				if i >= 65535 {
					dst = at(pubY, uint16(1+i-65535))
				}
				send(t, s, dst, "")
			}
			st := r.Stats()
			if st.Mappings != ports || st.NoPort != 1 {
				t.Errorf("Mappings %d, NoPort %d; want %d and 1", st.Mappings, st.NoPort, ports)
			}
			seen := map[uint16]bool{}
			for _, m := range r.Mappings() {
				seen[m.External.Port()] = true
			}
			if len(seen) != ports {
				t.Errorf("%d distinct external ports, want %d", len(seen), ports)
			}
		})
	}
}

// TestSetupMistakes: configuration errors panic with a message naming the problem.
func TestSetupMistakes(t *testing.T) {
	cases := []struct {
		name string
		do   func(n *natlab.Network)
	}{
		{"duplicate name", func(n *natlab.Network) { n.AddPublicHost("h", pubX); n.AddPublicHost("h", pubY) }},
		{"duplicate address", func(n *natlab.Network) { n.AddPublicHost("h1", pubX); n.AddPublicHost("h2", pubX) }},
		{"host without address", func(n *natlab.Network) { n.AddPublicHost("h") }},
		{"NAT without public IP", func(n *natlab.Network) { n.AddNAT(natlab.NATConfig{Name: "r"}) }},
		{"NAT without name", func(n *natlab.Network) { n.AddNAT(natlab.NATConfig{PublicIP: natA}) }},
		{"NAT on a host's address", func(n *natlab.Network) {
			n.AddPublicHost("h", natA)
			n.AddNAT(natlab.NATConfig{Name: "r", PublicIP: natA})
		}},
		{"firewall with public IP", func(n *natlab.Network) {
			n.AddNAT(natlab.NATConfig{Name: "f", Firewall: true, PublicIP: natA})
		}},
		{"firewall host on a public address", func(n *natlab.Network) {
			n.AddPublicHost("h", pubX)
			n.AddNAT(natlab.NATConfig{Name: "f", Firewall: true}).AddHost("inner", pubX)
		}},
		{"parent from another network", func(n *natlab.Network) {
			other := natlab.New(natlab.Config{})
			defer other.Close()
			p := other.AddNAT(natlab.NATConfig{Name: "p", PublicIP: natA})
			n.AddNAT(natlab.NATConfig{Name: "r", PublicIP: natB, Parent: p})
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := natlab.New(natlab.Config{})
			defer n.Close()
			defer func() {
				if recover() == nil {
					t.Error("no panic")
				}
			}()
			c.do(n)
		})
	}
}

// TestLogger: dropped packets are logged at debug level with their reason.
func TestLogger(t *testing.T) {
	var buf bytes.Buffer
	n := natlab.New(natlab.Config{Logger: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	defer n.Close()
	r := n.AddNAT(natlab.NATConfig{Name: "home", Type: eiPDpp, PublicIP: natA})
	x1 := listen(t, n.AddPublicHost("x", pubX), ":3478")
	listen(t, r.AddHost("inside", lanA), ":4000")
	send(t, x1, at(natA, 4000), "unsolicited")
	if got := buf.String(); !strings.Contains(got, "reason=\"no mapping\"") || !strings.Contains(got, "at=home") {
		t.Errorf("log %q lacks the reason and the NAT", got)
	}
}
