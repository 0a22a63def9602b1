package natlab_test

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"peerlink/nat"
	"peerlink/natlab"
)

// TestMatrix runs a small exchange for each of the 27×27 ordered pairs of NAT types:
// both peers learn their external address from a public observer, then each sends to
// the other's twice, alternately. Its point is that the lab is fast and never hangs;
// it asserts only outcomes the policies alone guarantee, not whether traversal works.
func TestMatrix(t *testing.T) {
	types := nat.AllTypes()
	start := time.Now()
	var both, oneWay, neither int
	for i, ta := range types {
		for j, tb := range types {
			aGot, bGot := exchange(t, uint64(i*len(types)+j), ta, tb)
			switch {
			case aGot && bGot:
				both++
			case aGot || bGot:
				oneWay++
			default:
				neither++
			}
			// Policy guarantees for this exchange:
			// - EI filtering admits the peer's packets to the observed mapping.
			// - With EI mapping on both sides, the first packets open each filter for
			//   exactly the address the second packets come from.
			// - With neither side EI in mapping or filtering, each packet reaches a
			//   mapping whose filter has only seen the observer.
			eiMap := ta.Mapping == nat.MappingEI && tb.Mapping == nat.MappingEI
			strict := func(x nat.Type) bool { return x.Mapping != nat.MappingEI && x.Filtering != nat.FilteringEI }
			wantA := ta.Filtering == nat.FilteringEI || eiMap
			wantB := tb.Filtering == nat.FilteringEI || eiMap
			if (wantA && !aGot) || (wantB && !bGot) {
				t.Errorf("%v × %v: a received %v, b received %v; policies guarantee a %v, b %v", ta, tb, aGot, bGot, wantA, wantB)
			}
			if strict(ta) && strict(tb) && (aGot || bGot) {
				t.Errorf("%v × %v: a received %v, b received %v; neither should", ta, tb, aGot, bGot)
			}
		}
	}
	elapsed := time.Since(start)
	t.Logf("%d pairs in %v: both ways %d, one way %d, neither %d", len(types)*len(types), elapsed.Round(time.Millisecond), both, oneWay, neither)
	if elapsed > time.Minute {
		t.Errorf("matrix took %v; it must stay well under a minute", elapsed)
	}
}

// exchange builds a two-NAT network and reports whether each peer heard the other.
func exchange(t *testing.T, seed uint64, ta, tb nat.Type) (aGot, bGot bool) {
	n := natlab.New(natlab.Config{Seed: seed})
	defer n.Close()
	obs := listen(t, n.AddPublicHost("observer", pubX), ":3478")
	ra := n.AddNAT(natlab.NATConfig{Name: "a", Type: ta, PublicIP: natA})
	rb := n.AddNAT(natlab.NATConfig{Name: "b", Type: tb, PublicIP: natB})
	a := listen(t, ra.AddHost("peer-a", lanA), ":0")
	b := listen(t, rb.AddHost("peer-b", lanA), ":0")
	extA, extB := learn(t, a, obs), learn(t, b, obs)
	// Delivery is synchronous, so the counter says which side each packet reached.
	var toA, toB uint64
	for range 2 {
		toB += delivered(n, func() { send(t, a, extB, "from a") })
		toA += delivered(n, func() { send(t, b, extA, "from b") })
	}
	heard := func(c net.PacketConn, k uint64, want string) bool {
		for range k {
			if msg, _ := recv(t, c); msg != want {
				t.Fatalf("got %q, want %q", msg, want)
			}
		}
		return k > 0
	}
	return heard(a, toA, "from b"), heard(b, toB, "from a")
}

// learn asks the observer for c's external address, as a STUN binding would.
func learn(t *testing.T, c, obs net.PacketConn) netip.AddrPort {
	t.Helper()
	send(t, c, at(pubX, 3478), "who am i")
	_, from := recv(t, obs)
	send(t, obs, from, from.String())
	msg, _ := recv(t, c)
	ap, err := netip.ParseAddrPort(msg)
	if err != nil {
		t.Fatalf("observer reply %q: %v", msg, err)
	}
	return ap
}
