package natlab_test

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"peerlink/nat"
	"peerlink/natlab"
)

// policyLab is one NAT with a host inside and two public hosts, x and y, outside.
type policyLab struct {
	n      *natlab.Network
	r      *natlab.NAT
	inside *natlab.Host
	x, y   *natlab.Host
}

func newPolicyLab(t *testing.T, cfg natlab.NATConfig) *policyLab {
	t.Helper()
	n := natlab.New(natlab.Config{Seed: 7})
	t.Cleanup(func() { n.Close() })
	if cfg.Name == "" {
		cfg.Name = "nat"
	}
	if !cfg.PublicIP.IsValid() && !cfg.Firewall {
		cfg.PublicIP = natA
	}
	r := n.AddNAT(cfg)
	return &policyLab{
		n:      n,
		r:      r,
		inside: r.AddHost("inside", lanA),
		x:      n.AddPublicHost("x", pubX),
		y:      n.AddPublicHost("y", pubY),
	}
}

// TestMappingPolicy sends from one inside socket to x:3478, x:3479 and y:3478 and
// compares the external addresses they observe.
func TestMappingPolicy(t *testing.T) {
	for _, typ := range nat.AllTypes() {
		t.Run(typ.String(), func(t *testing.T) {
			l := newPolicyLab(t, natlab.NATConfig{Type: typ})
			observers := []struct {
				c  net.PacketConn
				at netip.AddrPort
			}{
				{listen(t, l.x, ":3478"), at(pubX, 3478)},
				{listen(t, l.x, ":3479"), at(pubX, 3479)},
				{listen(t, l.y, ":3478"), at(pubY, 3478)},
			}
			s := listen(t, l.inside, ":0")
			var seen []netip.AddrPort
			for _, o := range observers {
				send(t, s, o.at, "probe")
				_, from := recv(t, o.c)
				if from.Addr() != natA {
					t.Errorf("%v saw source IP %v, want the NAT's %v", o.at, from.Addr(), natA)
				}
				seen = append(seen, from)
			}
			sameAcrossPorts, sameAcrossHosts := seen[0] == seen[1], seen[0] == seen[2]
			wantPorts, wantHosts, wantMappings := true, true, 1
			switch typ.Mapping {
			case nat.MappingHD:
				wantHosts, wantMappings = false, 2
			case nat.MappingPD:
				wantPorts, wantHosts, wantMappings = false, false, 3
			}
			if sameAcrossPorts != wantPorts || sameAcrossHosts != wantHosts {
				t.Errorf("external addresses %v: same across ports %v (want %v), same across hosts %v (want %v)",
					seen, sameAcrossPorts, wantPorts, sameAcrossHosts, wantHosts)
			}
			if got := len(l.r.Mappings()); got != wantMappings {
				t.Errorf("NAT holds %d mappings, want %d: %v", got, wantMappings, l.r.Mappings())
			}
		})
	}
}

// TestFilteringPolicy opens a mapping towards x:3478 and checks which of x:3478,
// x:3479 and y:3478 may then send to it.
func TestFilteringPolicy(t *testing.T) {
	for _, typ := range nat.AllTypes() {
		t.Run(typ.String(), func(t *testing.T) {
			l := newPolicyLab(t, natlab.NATConfig{Type: typ})
			x1 := listen(t, l.x, ":3478")
			x2 := listen(t, l.x, ":3479")
			y1 := listen(t, l.y, ":3478")
			s := listen(t, l.inside, ":0")

			// Nothing is admitted before the inside socket has sent.
			expectDropped(t, l.n, "before any outbound packet", func() { send(t, y1, at(natA, localPort(s)), "unsolicited") })
			if st := l.r.Stats(); st.NoMapping != 1 {
				t.Errorf("unsolicited packet: NoMapping = %d, want 1", st.NoMapping)
			}

			send(t, s, at(pubX, 3478), "open")
			_, ext := recv(t, x1)

			cases := []struct {
				name string
				from net.PacketConn
				want bool
			}{
				{"contacted ip:port", x1, true},
				{"contacted ip, other port", x2, typ.Filtering != nat.FilteringPD},
				{"other ip", y1, typ.Filtering == nat.FilteringEI},
			}
			for _, c := range cases {
				before := l.r.Stats().Filtered
				got := delivered(l.n, func() { send(t, c.from, ext, c.name) }) == 1
				if got != c.want {
					t.Errorf("%s: arrived %v, want %v", c.name, got, c.want)
				}
				if got {
					if msg, _ := recv(t, s); msg != c.name {
						t.Errorf("%s: received %q", c.name, msg)
					}
				}
				if filtered := l.r.Stats().Filtered - before; !c.want && filtered != 1 {
					t.Errorf("%s: Filtered rose by %d, want 1", c.name, filtered)
				}
			}
		})
	}
}

// TestAllocationPolicy opens several fresh sockets (and, for HD and PD mapping, a
// second destination from the last one) and checks the external ports the NAT gives
// each new mapping.
func TestAllocationPolicy(t *testing.T) {
	type tc struct {
		typ   nat.Type
		delta int
	}
	var cases []tc
	for _, typ := range nat.AllTypes() {
		if typ.Allocation == nat.AllocationPC {
			for _, d := range []int{1, 2, -3} {
				cases = append(cases, tc{typ, d})
			}
			continue
		}
		cases = append(cases, tc{typ, 0})
	}
	for _, c := range cases {
		name := c.typ.String()
		if c.delta != 0 {
			name += fmt.Sprintf("/delta=%d", c.delta)
		}
		t.Run(name, func(t *testing.T) {
			l := newPolicyLab(t, natlab.NATConfig{Type: c.typ, Delta: c.delta})
			x1 := listen(t, l.x, ":3478")
			y1 := listen(t, l.y, ":3478")
			var locals, exts []int
			var last net.PacketConn
			for range 5 {
				last = listen(t, l.inside, ":0")
				send(t, last, at(pubX, 3478), "probe")
				_, from := recv(t, x1)
				locals = append(locals, int(localPort(last)))
				exts = append(exts, int(from.Port()))
			}
			send(t, last, at(pubY, 3478), "probe")
			_, toY := recv(t, y1)
			second := int(toY.Port())
			newMapping := c.typ.Mapping != nat.MappingEI
			if !newMapping && second != exts[4] {
				t.Fatalf("EI mapping gave a second destination port %d, want %d", second, exts[4])
			}
			if newMapping {
				if second == exts[4] {
					t.Fatalf("%v mapping reused port %d for a second destination", c.typ.Mapping, second)
				}
				exts = append(exts, second)
			}
			if got, want := l.r.Stats().Mappings, uint64(len(exts)); got != want {
				t.Errorf("Mappings = %d, want %d", got, want)
			}

			preserved := 0
			for i, p := range locals {
				if exts[i] == p {
					preserved++
				}
			}
			steps := map[int]bool{}
			for i := 1; i < len(exts); i++ {
				steps[mod(exts[i]-exts[i-1])] = true
			}
			t.Logf("locals %v, external ports %v", locals, exts)
			switch c.typ.Allocation {
			case nat.AllocationPP:
				if preserved != len(locals) {
					t.Errorf("%d of %d fresh sockets kept their port", preserved, len(locals))
				}
				if newMapping && second == locals[4] {
					t.Errorf("second mapping of port %d preserved it although the first holds it", second)
				}
			case nat.AllocationPC:
				if len(steps) != 1 || !steps[mod(c.delta)] {
					t.Errorf("steps between new mappings %v, want only %d", steps, c.delta)
				}
			case nat.AllocationRD:
				if preserved != 0 {
					t.Errorf("%d fresh sockets kept their port under random allocation", preserved)
				}
				if len(steps) == 1 {
					t.Errorf("random allocation has a constant step %v", steps)
				}
			}
			for _, p := range exts {
				if c.typ.Allocation != nat.AllocationPP && (p < 1024 || p > 65535) {
					t.Errorf("port %d outside 1024-65535", p)
				}
			}
		})
	}
}

// mod reduces a port difference to the allocator's 1024-65535 cycle.
func mod(d int) int {
	const span = 65535 - 1024 + 1
	return (d%span + span) % span
}

// TestPortPreservationCollision: two hosts using the same local port cannot both keep
// it; the second gets another port and both mappings work.
func TestPortPreservationCollision(t *testing.T) {
	l := newPolicyLab(t, natlab.NATConfig{Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP}})
	other := l.r.AddHost("other", lanA2)
	x1 := listen(t, l.x, ":3478")
	a := listen(t, l.inside, ":5000")
	b := listen(t, other, ":5000")
	send(t, a, at(pubX, 3478), "a")
	_, extA := recv(t, x1)
	send(t, b, at(pubX, 3478), "b")
	_, extB := recv(t, x1)
	if extA.Port() != 5000 {
		t.Errorf("first host's port became %d, want 5000 preserved", extA.Port())
	}
	if extB.Port() == 5000 {
		t.Fatalf("second host also got 5000")
	}
	send(t, x1, extA, "to a")
	send(t, x1, extB, "to b")
	if msg, _ := recv(t, a); msg != "to a" {
		t.Errorf("a got %q", msg)
	}
	if msg, _ := recv(t, b); msg != "to b" {
		t.Errorf("b got %q", msg)
	}
}
