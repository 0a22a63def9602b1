package soak

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestRebindRepro documents what a NAT rebinding does to a running node: after its
// NAT moves to a new public address (or, with a random-port NAT, forgets its mappings)
// the node still advertises its old reflexive address and its TURN allocation is bound
// to the old 5-tuple, so connections to and from it fail until it restarts. It only runs
// with PEERLINK_SOAK_REPRO=1: it reports what happens rather than guarding behaviour.
func TestRebindRepro(t *testing.T) {
	if os.Getenv("PEERLINK_SOAK_REPRO") == "" {
		t.Skip("set PEERLINK_SOAK_REPRO=1 to run")
	}
	for _, tc := range []struct {
		name   string
		a, b   int // indexes into kinds
		rebind string
	}{
		{"new public IP, ei-pd-pp", 0, 0, "ip"},
		{"flush, ei-pd-rd", 4, 0, "flush"},
		{"flush, ei-pd-pp", 0, 0, "flush"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sig := signaltest.Start(t, signal.Config{}, false)
			w := newWorld(t, 3, sig)
			pr := shortParams()
			pr.peers, pr.loss, pr.jitter = len(kinds)*2, 0, 0
			peers := addPeers(w, pr)
			a, b := peers[tc.a], peers[len(kinds)+tc.b]
			a.manual, b.manual = true, true
			st := &stats{connects: map[connect.Method]int{}}
			ga, err := a.start(w, st)
			if err != nil {
				t.Fatal(err)
			}
			defer a.stop()
			gb, err := b.start(w, st)
			if err != nil {
				t.Fatal(err)
			}
			defer b.stop()
			try := func(what string, from, to *gen) {
				ctx, cancel := context.WithTimeout(context.Background(), 12*time.Second)
				defer cancel()
				start := time.Now()
				c, err := from.node.Connect(ctx, to.node.NodeID(), connect.Options{})
				if err != nil {
					t.Logf("%s: %s → %s: %v (after %v)", what, from.p.kind, to.p.kind, err, time.Since(start).Round(time.Millisecond))
					return
				}
				defer c.Close()
				actx, acancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer acancel()
				if ac, err := to.node.Accept(actx); err == nil {
					defer ac.Close()
				}
				t.Logf("%s: %s → %s: connected as %v", what, from.p.kind, to.p.kind, c.Method())
			}
			// A connection that lives through the rebinding.
			ctx, cancel := context.WithTimeout(context.Background(), 12*time.Second)
			defer cancel()
			live, err := ga.node.Connect(ctx, gb.node.NodeID(), connect.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer live.Close()
			peer, err := gb.node.Accept(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer peer.Close()
			time.Sleep(2 * time.Second)
			t.Logf("before: live connection %v", live.Method())
			if tc.rebind == "ip" {
				a.nat.SetPublicIP(netip.MustParseAddr("198.18.9.9"))
			} else {
				a.nat.Flush()
			}
			// Does the live connection still carry datagrams both ways?
			for _, dir := range []struct {
				name     string
				from, to *connect.Conn
			}{{"a→b", live, peer}, {"b→a", peer, live}} {
				ok := false
				for range 50 {
					dir.from.Send([]byte("x"))
					rctx, rcancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
					_, err := dir.to.Recv(rctx)
					rcancel()
					if err == nil {
						ok = true
						break
					}
				}
				t.Logf("after: live connection %s: delivered=%v, method now %v", dir.name, ok, live.Method())
			}
			try("after, new connection", ga, gb)
			try("after, new connection", gb, ga)
		})
	}
}

// TestNodeCloseRepro documents that a node's Close does not tell the peers of its
// connections: the far end of a relayed connection learns nothing (no bye, and the
// relayed path has no liveness check), so its Recv blocks until its own deadline.
// Only with PEERLINK_SOAK_REPRO=1.
// TestNodeCloseSaysBye: when a node closes, or only one connection, the peer's Recv
// ends at once with ErrClosed (a bye), not at its timeout.
func TestNodeCloseSaysBye(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	w := newWorld(t, 4, sig)
	pr := shortParams()
	pr.peers, pr.loss, pr.jitter = 2, 0, 0
	peers := addPeers(w, pr)
	a, b := peers[0], peers[1]
	a.manual, b.manual = true, true
	st := &stats{connects: map[connect.Method]int{}}
	ga, err := a.start(w, st)
	if err != nil {
		t.Fatal(err)
	}
	defer a.stop()
	gb, err := b.start(w, st)
	if err != nil {
		t.Fatal(err)
	}
	defer b.stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, noDirect := range []bool{true, false} {
		c, err := ga.node.Connect(ctx, gb.node.NodeID(), connect.Options{NoDirect: noDirect})
		if err != nil {
			t.Fatal(err)
		}
		ac, err := gb.node.Accept(ctx)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if !noDirect {
			b.stop() // the whole node goes
		} else {
			ac.Close() // only the connection: this one sends a bye
		}
		rctx, rcancel := context.WithTimeout(context.Background(), 8*time.Second)
		start := time.Now()
		_, err = c.Recv(rctx)
		rcancel()
		took := time.Since(start)
		t.Logf("NoDirect=%v, far end closed by %s: Recv returned after %v: %v (method %v)", noDirect,
			map[bool]string{true: "Conn.Close", false: "Node.Close"}[noDirect], took.Round(time.Millisecond), err, c.Method())
		if !errors.Is(err, connect.ErrClosed) || took > 2*time.Second {
			t.Errorf("NoDirect=%v: Recv after the far end closed: %v after %v, want ErrClosed at once", noDirect, err, took)
		}
		c.Close()
	}
}
