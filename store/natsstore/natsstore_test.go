package natsstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"peerlink/store"
	"peerlink/store/natsstore"
	"peerlink/store/natsstore/natstest"
	"peerlink/store/storetest"
)

func newStore(t *testing.T, url string, replicas int) *natsstore.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := natsstore.New(ctx, natsstore.Config{
		URL:      url,
		TTLs:     store.TTLs{Relays: storetest.RelayTTL},
		Replicas: replicas,
		Timeout:  2 * time.Second,
		Options:  []nats.Option{nats.ReconnectWait(50 * time.Millisecond)},
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformance(t *testing.T) {
	// Registered first, so it runs after the NATS server's own cleanup.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	srv := natstest.Start(t)
	storetest.Run(t, func(t *testing.T) (store.Store, store.Store) {
		return newStore(t, srv.ClientURL(), 1), newStore(t, srv.ClientURL(), 1)
	})
}

// TestClusterFailover: two stores on different nodes of a three-node cluster keep
// routing and reading replicated state after the node one of them used is killed.
func TestClusterFailover(t *testing.T) {
	c := natstest.StartCluster(t, 3)
	n1, n2, n3 := c.Servers[0].ClientURL(), c.Servers[1].ClientURL(), c.Servers[2].ClientURL()
	a := newStore(t, n1+","+n2+","+n3, 3)
	defer a.Close()
	b := newStore(t, n2+","+n3+","+n1, 3)
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Put(ctx, store.Profiles, "n1", []byte("profile")); err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 4)
	if _, err := a.Attach("peer", func(f []byte) error { got <- f; return nil }); err != nil {
		t.Fatal(err)
	}
	routeEventually := func(msg string) {
		t.Helper()
		for {
			err := b.Route(ctx, "peer", []byte(msg))
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("Route %s: %v", msg, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if f := <-got; string(f) != msg {
			t.Fatalf("got %q, want %q", f, msg)
		}
	}
	routeEventually("before")

	c.Kill(0) // a's server
	start := time.Now()
	routeEventually("after")
	t.Logf("routing resumed %v after the kill", time.Since(start))
	for {
		v, err := b.Get(ctx, store.Profiles, "n1")
		if err == nil && string(v) == "profile" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("replicated value unreadable after kill: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := a.Put(ctx, store.Profiles, "n2", []byte("x")); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		// A write may need the new stream leader; retry briefly.
		for err != nil && ctx.Err() == nil {
			time.Sleep(50 * time.Millisecond)
			err = a.Put(ctx, store.Profiles, "n2", []byte("x"))
		}
		if err != nil {
			t.Fatalf("Put after kill: %v", err)
		}
	}
	t.Logf("state readable and writable %v after the kill", time.Since(start))
}
