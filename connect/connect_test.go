package connect

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/nat"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/pion/transport/v4/deadline.(*Deadline).Set.func1"))
}

func mustType(t testing.TB, s string) nat.Type {
	ty, err := nat.ParseType(s)
	if err != nil {
		t.Fatal(err)
	}
	return ty
}

func TestConnectMethods(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	tests := []struct {
		name   string
		a, b   nodeOpts
		opts   Options
		method Method
	}{
		{"port-restricted pair punches", nodeOpts{typ: mustType(t, "ei-pd-pp")}, nodeOpts{typ: mustType(t, "ei-pd-pp")}, Options{}, MethodPunched},
		{"to a public host is direct", nodeOpts{typ: mustType(t, "pd-pd-rd")}, nodeOpts{open: true}, Options{}, MethodDirect},
		{"from a public host (reversal) is direct", nodeOpts{open: true}, nodeOpts{typ: mustType(t, "pd-pd-rd")}, Options{}, MethodDirect},
		{"symmetric pair is relayed", nodeOpts{typ: mustType(t, "pd-pd-rd")}, nodeOpts{typ: mustType(t, "hd-pd-rd")}, Options{}, MethodRelayed},
		{"detected profiles", nodeOpts{typ: mustType(t, "ei-hd-pc"), detect: true}, nodeOpts{typ: mustType(t, "pd-ei-rd"), detect: true}, Options{}, MethodPunched},
		{"relay only when asked", nodeOpts{typ: mustType(t, "ei-ei-pp")}, nodeOpts{typ: mustType(t, "ei-pd-pp")}, Options{NoDirect: true}, MethodRelayed},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, uint64(i+1), sig)
			a, b := w.node("a", tt.a), w.node("b", tt.b)
			c, err := pair(t, a, b, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			// The direct path may come after the relayed one: wait for it to settle.
			deadline := time.Now().Add(10 * time.Second)
			for c.Method() != tt.method && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if c.Method() != tt.method {
				t.Errorf("method %v (technique %v), want %v", c.Method(), c.Technique(), tt.method)
			}
			t.Logf("%s: %v via %v, first path %v, direct %v", tt.name, c.Method(), c.Technique(), c.Stats().FirstPath, c.Stats().ToDirect)
		})
	}
}

func TestConnectErrors(t *testing.T) {
	// A rendezvous server that does not relay, so that a pair with no TURN relay has
	// no path at all (TestHTTPSRelay has the server relay).
	sig := signaltest.Start(t, signal.Config{Relay: signal.RelayConfig{Disabled: true}}, false)
	w := newWorld(t, 1, sig)
	a := w.node("a", nodeOpts{typ: mustType(t, "pd-pd-rd"), noRelay: true})
	b := w.node("b", nodeOpts{typ: mustType(t, "pd-pd-rd"), noRelay: true})

	// Symmetric on both sides, no relay: refused at once with the reason.
	if _, err := pair(t, a, b, Options{NoRelay: true}); !errors.Is(err, ErrSymmetricNAT) {
		t.Errorf("symmetric pair without relay: %v, want ErrSymmetricNAT", err)
	}
	// Relay allowed but none configured: a clear error, not a hang.
	start := time.Now()
	if _, err := pair(t, a, b, Options{}); !errors.Is(err, ErrNoRelay) {
		t.Errorf("symmetric pair, no relay configured: %v, want ErrNoRelay", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("failing took %v", d)
	}
	// A relay that is down: a clear error naming it, not a hang.
	w.relay = &RelayConfig{Server: "203.0.113.99:3478", Username: "peer", Password: "secret"}
	c := w.node("c", nodeOpts{typ: mustType(t, "pd-pd-rd")})
	d := w.node("d", nodeOpts{typ: mustType(t, "hd-pd-rd")})
	start = time.Now()
	_, err := pair(t, c, d, Options{})
	if !errors.Is(err, ErrNoRelay) || !strings.Contains(err.Error(), "203.0.113.99:3478") {
		t.Errorf("relay down: %v, want ErrNoRelay naming the relay", err)
	}
	if d := time.Since(start); d > 8*time.Second {
		t.Errorf("failing with the relay down took %v", d)
	}

	// An offline peer: ErrPeerOffline at once.
	off := w.node("e", nodeOpts{typ: mustType(t, "ei-ei-pp"), noRelay: true})
	offID := off.NodeID()
	off.Close()
	off.signal().Close() // the node does not own its signaling client
	// Wait for the server to notice, as a peer would see it some time after it left.
	for deadline := time.Now().Add(5 * time.Second); ; {
		p, err := a.signal().Lookup(context.Background(), offID)
		if err == nil && !p.Online {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server still lists the closed node online (%v)", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	start = time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := a.Connect(ctx, offID, Options{}); !errors.Is(err, ErrPeerOffline) {
		t.Errorf("offline peer: %v, want ErrPeerOffline", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("ErrPeerOffline took %v, want under 1s", d)
	}
}

// TestConnectRelayedUnderLoss: two symmetric NATs on uplinks that lose 30% of packets
// each way. The relayed path is confirmed by pings that are lost as often as not, so
// both sides must keep pinging after the plan is made, until one comes through.
func TestConnectRelayedUnderLoss(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	for seed := range uint64(4) {
		w := newWorld(t, 50+seed, sig)
		a := w.node("a", nodeOpts{typ: mustType(t, "pd-pd-rd"), loss: 0.3})
		b := w.node("b", nodeOpts{typ: mustType(t, "pd-pd-rd"), loss: 0.3})
		for i := range 3 {
			c, err := pair(t, a, b, Options{})
			if err != nil {
				t.Fatalf("seed %d, connection %d: %v", seed, i, err)
			}
			if c.Method() != MethodRelayed {
				t.Errorf("seed %d, connection %d: method %v, want relayed", seed, i, c.Method())
			}
			c.Close()
		}
	}
}
