package connecttest

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/connect"
	"peerlink/natlab"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/pion/transport/v4/deadline.(*Deadline).Set.func1"))
}

// TestPairs connects nodes of a test world and checks that datagrams flow both ways by
// the method each pair's NATs allow.
func TestPairs(t *testing.T) {
	tests := []struct {
		a, b   NodeConfig
		method connect.Method
	}{
		{NodeConfig{}, NodeConfig{NAT: "ei-pd-pp"}, connect.MethodPunched},
		{NodeConfig{NAT: "symmetric"}, NodeConfig{NAT: "open"}, connect.MethodDirect},
		{NodeConfig{NAT: "symmetric", WaitRelay: true}, NodeConfig{NAT: "pd-pd-rd", WaitRelay: true}, connect.MethodRelayed},
		{NodeConfig{NAT: "cgnat", Detect: true, Link: natlab.Link{Latency: time.Millisecond}}, NodeConfig{NAT: "full-cone", Detect: true}, connect.MethodDirect},
	}
	for i, tt := range tests {
		t.Run(tt.a.NAT+"/"+tt.b.NAT, func(t *testing.T) {
			w := NewWorld(t, Config{Seed: uint64(i)})
			a, b := w.AddNode(tt.a), w.AddNode(tt.b)
			if a.Site.Host.Name() != "node1" || b.Site.Host.Name() != "node2" {
				t.Errorf("hosts %s, %s, want node1, node2", a.Site.Host.Name(), b.Site.Host.Name())
			}
			if tt.a.Detect && a.Profile().Type() != a.Site.Profile.Type() {
				t.Errorf("detected %v, built as %v", a.Profile().Type(), a.Site.Profile.Type())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			ca, cb, err := Pair(ctx, a, b, connect.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer ca.Close()
			defer cb.Close()
			if cb.Peer() != a.NodeID() || a.Identity.NodeID() != a.NodeID() {
				t.Errorf("b accepted %s, want %s", cb.Peer().Short(), a.NodeID().Short())
			}
			for ca.Method() != tt.method && ctx.Err() == nil {
				time.Sleep(10 * time.Millisecond)
			}
			if ca.Method() != tt.method {
				t.Fatalf("method %v, want %v", ca.Method(), tt.method)
			}
			for _, d := range []struct{ from, to *connect.Conn }{{ca, cb}, {cb, ca}} {
				if err := roundTrip(ctx, d.from, d.to); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

func roundTrip(ctx context.Context, from, to *connect.Conn) error {
	for {
		from.Send([]byte("ping"))
		rctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		b, err := to.Recv(rctx)
		cancel()
		if err == nil && string(b) == "ping" {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

func TestErrors(t *testing.T) {
	w, err := Start(Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx := context.Background()
	if _, err := w.StartNode(ctx, NodeConfig{NAT: "ei-xx-pp"}); !errors.Is(err, ErrBadNAT) {
		t.Errorf("bad NAT: %v, want ErrBadNAT", err)
	}
	// A relay that is down: WaitRelay says so.
	w.Relay = &connect.RelayConfig{Server: "203.0.113.99:3478", Username: "peer", Password: "secret"}
	ctx2, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if n, err := w.StartNode(ctx2, NodeConfig{NAT: "symmetric", WaitRelay: true}); err == nil {
		n.Close()
		t.Error("WaitRelay with the relay down: no error")
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("AddNode on a world from Start did not panic")
			}
		}()
		w.AddNode(NodeConfig{})
	}()
	w.Close()
	w.Close()
}
