package connect

import (
	"context"
	"testing"
	"time"

	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestSetSignal checks that a node given a new rendezvous client (as after its server
// connection dropped) keeps its connections and is reachable through the new one.
func TestSetSignal(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	w := newWorld(t, 91, sig)
	a := w.node("a", nodeOpts{typ: mustType(t, "ei-pd-pp")})
	b := w.node("b", nodeOpts{typ: mustType(t, "ei-pd-pp")})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ca, cb := connected(t, a, b)

	old := b.signal()
	fresh := sig.DialAs(t, b.id, nil)
	if err := b.SetSignal(ctx, fresh); err != nil {
		t.Fatal(err)
	}
	old.Close()
	if err := roundTrip(ctx, ca, cb, "after the switch a→b"); err != nil {
		t.Fatalf("the connection made before the switch: %v", err)
	}
	if err := roundTrip(ctx, cb, ca, "after the switch b→a"); err != nil {
		t.Fatalf("the connection made before the switch: %v", err)
	}
	// Both directions of new connections go through the new client.
	if _, err := pair(t, a, b, Options{}); err != nil {
		t.Fatalf("a new connection to the node: %v", err)
	}
	if _, err := pair(t, b, a, Options{}); err != nil {
		t.Fatalf("a new connection from the node: %v", err)
	}
	if err := b.SetSignal(ctx, nil); err == nil {
		t.Error("SetSignal(nil) succeeded")
	}
	b.Close()
	if err := b.SetSignal(ctx, fresh); err == nil {
		t.Error("SetSignal on a closed node succeeded")
	}
}
