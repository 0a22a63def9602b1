package natlab_test

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"testing"

	"peerlink/nat"
	"peerlink/natlab"
)

// trace is what one run of a fixed script observed.
type trace struct {
	ports []string // local->external for each new mapping
	lost  []int    // indices of packets lost on a lossy uplink
}

// runScript performs the same operations on a fresh network with the given seed. With
// extra, an unrelated NAT with its own traffic is added first.
func runScript(t *testing.T, seed uint64, extra bool) trace {
	t.Helper()
	n := natlab.New(natlab.Config{Seed: seed, QueueLen: 1000})
	defer n.Close()
	x1 := listen(t, n.AddPublicHost("x", pubX), ":3478")
	if extra {
		o := n.AddNAT(natlab.NATConfig{Name: "unrelated", Type: nat.Type{Mapping: nat.MappingPD, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD},
			PublicIP: netip.MustParseAddr("198.51.100.77"), Uplink: natlab.Link{Loss: 0.5}})
		s := listen(t, o.AddHost("unrelated-host", lanA), ":0")
		for range 50 {
			send(t, s, at(pubX, 3478), "noise")
		}
		for range n.Stats().Delivered {
			recv(t, x1)
		}
	}
	var tr trace
	for i, typ := range []nat.Type{
		{Mapping: nat.MappingPD, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD},
		{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPC},
	} {
		r := n.AddNAT(natlab.NATConfig{Name: typ.String(), Type: typ, PublicIP: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i)})})
		h := r.AddHost(typ.String()+"-host", lanA)
		for range 5 {
			s := listen(t, h, ":0")
			send(t, s, at(pubX, 3478), "probe")
			_, from := recv(t, x1)
			tr.ports = append(tr.ports, fmt.Sprintf("%d->%d", localPort(s), from.Port()))
		}
	}

	lossy := n.AddNAT(natlab.NATConfig{Name: "lossy", Type: eiEIpp, PublicIP: natA, Uplink: natlab.Link{Loss: 0.3}})
	s := listen(t, lossy.AddHost("lossy-host", lanA), ":4000")
	const total = 200
	got := delivered(n, func() {
		for i := range total {
			send(t, s, at(pubX, 3478), strconv.Itoa(i))
		}
	})
	arrived := map[int]bool{}
	for range got {
		msg, _ := recv(t, x1)
		i, _ := strconv.Atoi(msg)
		arrived[i] = true
	}
	for i := range total {
		if !arrived[i] {
			tr.lost = append(tr.lost, i)
		}
	}
	return tr
}

func TestDeterminism(t *testing.T) {
	a := runScript(t, 42, false)
	b := runScript(t, 42, false)
	if !slices.Equal(a.ports, b.ports) || !slices.Equal(a.lost, b.lost) {
		t.Errorf("same seed, different runs:\n%v %v\n%v %v", a.ports, a.lost, b.ports, b.lost)
	}
	if len(a.lost) == 0 || len(a.lost) == 200 {
		t.Fatalf("lossy link lost %d of 200; the script is not exercising loss", len(a.lost))
	}
	c := runScript(t, 43, false)
	if slices.Equal(a.ports, c.ports) || slices.Equal(a.lost, c.lost) {
		t.Errorf("seeds 42 and 43 gave the same ports or losses:\n%v %v\n%v %v", a.ports, a.lost, c.ports, c.lost)
	}
	d := runScript(t, 42, true)
	if !slices.Equal(a.ports, d.ports) || !slices.Equal(a.lost, d.lost) {
		t.Errorf("an unrelated NAT changed the others' randomness:\n%v %v\n%v %v", a.ports, a.lost, d.ports, d.lost)
	}
	t.Logf("seed 42: ports %v, lost %d", a.ports, len(a.lost))
}

// TestIndependentStreams: two NATs of the same random type in one network draw from
// different streams, so they do not allocate the same ports in lockstep.
func TestIndependentStreams(t *testing.T) {
	n := natlab.New(natlab.Config{Seed: 9})
	defer n.Close()
	n.AddPublicHost("x", pubX)
	pdRD := nat.Type{Mapping: nat.MappingPD, Filtering: nat.FilteringEI, Allocation: nat.AllocationRD}
	var ports [2][]uint16
	for i, ip := range []netip.Addr{natA, natB} {
		r := n.AddNAT(natlab.NATConfig{Name: fmt.Sprint("rd", i), Type: pdRD, PublicIP: ip})
		s := listen(t, r.AddHost(fmt.Sprint("host", i), lanA), ":4000")
		for k := range 5 {
			send(t, s, at(pubX, 3478+uint16(k)), "probe") // a new mapping each
		}
		for _, m := range r.Mappings() {
			ports[i] = append(ports[i], m.External.Port())
		}
	}
	if len(ports[0]) != 5 || slices.Equal(ports[0], ports[1]) {
		t.Errorf("NATs allocated %v and %v; want 5 ports each, not the same", ports[0], ports[1])
	}
}
