package connect

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"peerlink/internal/emuworld"
	"peerlink/natlab"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestRebind moves one peer's NAT to a new public IP, or makes a random-port NAT
// forget its mappings, while a connection runs: the connection carries datagrams
// both ways again soon after, and a punched one gets its direct path back (the node
// re-learns its public address, tells the peer, and the direct path roams to it);
// new connections to and from the node work.
func TestRebind(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	for i, tc := range []struct {
		name   string
		typ    string
		rebind func(*natlab.NAT)
		method Method
	}{
		{"new public IP, punched", "ei-pd-pp", func(n *natlab.NAT) { n.SetPublicIP(netip.MustParseAddr("198.18.9.9")) }, MethodPunched},
		{"flush of a random-port NAT, punched", "ei-hd-rd", (*natlab.NAT).Flush, MethodPunched},
		{"new public IP, relayed", "pd-pd-rd", func(n *natlab.NAT) { n.SetPublicIP(netip.MustParseAddr("198.18.9.10")) }, MethodRelayed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t, uint64(140+i), sig)
			var site *emuworld.Site
			pc := PathCheck{Retry: time.Second}
			a := w.node("a", nodeOpts{typ: mustType(t, tc.typ), pathCheck: pc, refresh: 500 * time.Millisecond, site: func(s *emuworld.Site) { site = s }})
			b := w.node("b", nodeOpts{typ: mustType(t, tc.typ), pathCheck: pc, refresh: 500 * time.Millisecond})
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			ca, cb := connected(t, a, b)
			bothMethod(t, ca, cb, tc.method, 10*time.Second)
			before := a.Profile().Public()

			tc.rebind(site.NAT)
			start := time.Now()
			rctx, rcancel := context.WithTimeout(ctx, 20*time.Second)
			if err := roundTrip(rctx, ca, cb, "a→b after"); err != nil {
				t.Fatalf("a→b after the rebinding: %v", err)
			}
			if err := roundTrip(rctx, cb, ca, "b→a after"); err != nil {
				t.Fatalf("b→a after the rebinding: %v", err)
			}
			rcancel()
			carried := time.Since(start)
			back := bothMethod(t, ca, cb, tc.method, 20*time.Second)
			after := a.Profile().Public()
			if after == before {
				t.Errorf("the node still says its public address is %v", before)
			}
			t.Logf("%s: public %v → %v; datagrams both ways %v after; %v on both %v after that; stats %+v",
				tc.name, before, after, carried.Round(time.Millisecond), tc.method, back.Round(time.Millisecond), ca.Stats())
			// New connections both ways, with the published address up to date.
			if _, err := pair(t, b, a, Options{}); err != nil {
				t.Errorf("a new connection to the rebound node: %v", err)
			}
			if _, err := pair(t, a, b, Options{}); err != nil {
				t.Errorf("a new connection from the rebound node: %v", err)
			}
		})
	}
}

// TestNetworkChangedRetriesDirect: a connection that fell back to the relay retries its
// direct path at once when the node hears the network changed, not at the next
// PathCheck.Retry (an hour here).
func TestNetworkChangedRetriesDirect(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	w := newWorld(t, 150, sig)
	var cut cutter
	pc := PathCheck{Retry: time.Hour}
	a := w.node("a", nodeOpts{typ: mustType(t, "ei-pd-pp"), wrap: cut.wrap, pathCheck: pc})
	b := w.node("b", nodeOpts{typ: mustType(t, "ei-pd-pp"), pathCheck: pc})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ca, cb := connected(t, a, b)
	both := func(m Method, within time.Duration) { t.Helper(); bothMethod(t, ca, cb, m, within) }
	both(MethodPunched, 10*time.Second)
	for !relayUp(ca) || !relayUp(cb) {
		if ctx.Err() != nil {
			t.Fatal("the relayed path never came up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cut.in.Store(true)
	cut.out.Store(true)
	both(MethodRelayed, 5*time.Second)
	cut.in.Store(false)
	cut.out.Store(false)
	time.Sleep(time.Second)
	if ca.Method() != MethodRelayed {
		t.Fatalf("moved back to %v before any retry was due", ca.Method())
	}
	start := time.Now()
	a.NetworkChanged()
	b.NetworkChanged()
	both(MethodPunched, 5*time.Second)
	t.Logf("back on the direct path %v after NetworkChanged", time.Since(start).Round(time.Millisecond))
}
