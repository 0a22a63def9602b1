package signal_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/store/natsstore"
	"peerlink/store/natsstore/natstest"
)

// TestRelayNATS: two nodes on different rendezvous servers relay through NATS between
// the servers; datagrams cross both ways, and one end leaving ends the other.
func TestRelayNATS(t *testing.T) {
	ns := natstest.Start(t)
	newStore := func() *natsstore.Store {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		st, err := natsstore.New(ctx, natsstore.Config{URL: ns.ClientURL(), Timeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	s1 := signaltest.Start(t, signal.Config{Store: newStore(), StoreTimeout: 2 * time.Second}, false)
	s2 := signaltest.Start(t, signal.Config{Store: newStore(), StoreTimeout: 2 * time.Second}, false)
	a, b := s1.Dial(t, nil), s2.Dial(t, nil)

	// b's subject takes a moment to be known; until then opens find no route.
	acc := make(chan *signal.RelayConn, 1)
	go func() {
		rc, err := b.AcceptRelay(ctxT(t))
		if err != nil {
			t.Errorf("AcceptRelay: %v", err)
		}
		acc <- rc
	}()
	var ra *signal.RelayConn
	deadline := time.Now().Add(5 * time.Second)
	for {
		var err error
		ra, err = a.OpenRelayTag(ctxT(t), b.NodeID(), "via-nats")
		if err == nil {
			break
		}
		if !errors.Is(err, signal.ErrPeerOffline) || time.Now().After(deadline) {
			t.Fatalf("OpenRelay across servers: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	rb := <-acc
	if rb == nil || rb.Tag() != "via-nats" {
		t.FailNow()
	}
	pingPong(t, ra, rb, 30)
	if s1.RelayStats().Sessions != 1 || s2.RelayStats().Sessions != 1 {
		t.Fatalf("sessions: %d on s1, %d on s2", s1.RelayStats().Sessions, s2.RelayStats().Sessions)
	}
	b.Close()
	select {
	case <-ra.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a's end outlived b across servers")
	}
	if !errors.Is(ra.Err(), signal.ErrRelayClosed) {
		t.Fatalf("a's end: %v", ra.Err())
	}
	waitFor(t, "sessions forgotten", func() bool { return s1.RelayStats().Sessions == 0 && s2.RelayStats().Sessions == 0 })
}
