package signal_test

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/store/natsstore"
	"peerlink/store/natsstore/natstest"
)

// TestNATSCluster: two rendezvous servers share state and routing through a three-node
// NATS cluster; peers on different servers signal each other, and keep doing so after
// the NATS node one server was using is killed.
func TestNATSCluster(t *testing.T) {
	cl := natstest.StartCluster(t, 3)
	url := func(order ...int) string {
		var u []string
		for _, i := range order {
			u = append(u, cl.Servers[i].ClientURL())
		}
		return strings.Join(u, ",")
	}
	newStore := func(u string) *natsstore.Store {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		st, err := natsstore.New(ctx, natsstore.Config{
			URL: u, Replicas: 3, Timeout: 2 * time.Second,
			Options: []nats.Option{nats.ReconnectWait(50 * time.Millisecond), nats.DontRandomize()},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() }) // registered before the servers: runs after them
		return st
	}
	st1, st2 := newStore(url(0, 1, 2)), newStore(url(1, 2, 0))
	s1 := signaltest.Start(t, signal.Config{Store: st1, StoreTimeout: 2 * time.Second}, false)
	s2 := signaltest.Start(t, signal.Config{Store: st2, StoreTimeout: 2 * time.Second}, false)
	a, b := s1.Dial(t, nil), s2.Dial(t, nil)
	ctx := ctxT(t)
	info := testInfo()

	// Interest in b's subject spreads through the cluster in a moment; until then a
	// send may find no route.
	send := func(from, to *signal.Client, session string) error {
		return from.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: to.NodeID(), Session: session, Info: &info})
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := send(a, b, "warmup")
		if err == nil {
			break
		}
		if !errors.Is(err, signal.ErrPeerOffline) || time.Now().After(deadline) {
			t.Fatalf("first cross-server send: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	recv(t, b)
	exchange(t, a, b)
	if err := a.Publish(ctx, info); err != nil {
		t.Fatal(err)
	}
	p, err := b.Lookup(ctx, a.NodeID())
	if err != nil || !p.Online || p.Info == nil || !reflect.DeepEqual(*p.Info, info) {
		t.Fatalf("cross-server Lookup = %+v, %v", p, err)
	}

	// Kill the NATS node s1 is connected to, then keep signaling both ways.
	killed := time.Now()
	cl.Kill(0)
	var recovered time.Duration
	failures := 0
	for i := 0; i < 20; i++ {
		from, to := a, b
		if i%2 == 1 {
			from, to = b, a
		}
		session := "after-kill-" + string(rune('a'+i))
		for {
			err := send(from, to, session)
			if err == nil {
				break
			}
			failures++
			if time.Since(killed) > 15*time.Second {
				t.Fatalf("signaling did not recover within 15s of the kill: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if recovered == 0 {
			recovered = time.Since(killed)
		}
		if m := recv(t, to); m.Session != session {
			t.Fatalf("got session %q, want %q", m.Session, session)
		}
	}
	t.Logf("after the kill: first message through in %v (%d failed sends), 20 delivered", recovered, failures)
	// Replicated state is still there.
	for {
		p, err = b.Lookup(ctx, a.NodeID())
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("Lookup after kill: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !p.Online || p.Info == nil {
		t.Fatalf("Lookup after kill = %+v", p)
	}
}
