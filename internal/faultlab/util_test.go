package faultlab

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/signal"
)

var errNoData = errors.New("connected, but no datagram came through")

// unaffectedStall is the longest stall a transfer the fault should not touch may show.
// A direct path that really broke stalls at least the 3 s it takes to fail over to the
// relay (PathCheck.Timeout) and a QUIC retransmission after it; a loaded two-core
// machine running four labs under the race detector stalls a healthy one for up to
// about 1.4 s (measured).
const unaffectedStall = 2 * time.Second

func survived(what string, ok bool) string {
	if ok {
		return what + ": yes"
	}
	return what + ": NO"
}

func orNever(ok bool, d time.Duration) time.Duration {
	if !ok {
		return Never
	}
	return d
}

// stallAfter describes the meter's longest silence that ended after t (or still goes
// on): the stall a fault at t caused.
func stallAfter(m *Meter, t time.Time) string {
	var longest Gap
	for _, g := range m.Gaps() {
		if g.To.After(t) && g.Len() > longest.Len() {
			longest = g
		}
	}
	if last := m.Last(); !last.After(t) || time.Since(last) > time.Second {
		return "since " + time.Since(last).Round(time.Millisecond).String() + " (never resumed)"
	}
	if longest.Len() == 0 {
		return "none"
	}
	return longest.Len().Round(time.Millisecond).String()
}

// ping sends datagrams from a to b until one arrives, for up to 3 s.
func ping(a, b *connect.Conn) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	got := make(chan bool, 1)
	go func() {
		_, err := b.Recv(ctx)
		got <- err == nil
	}()
	for {
		a.Send([]byte("ping"))
		select {
		case ok := <-got:
			return ok
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// signalRecovery sends a signed message from a to b through the rendezvous servers
// until one is routed (a bye for a session that does not exist, which b's node drops),
// and returns how long after from that was; Never if not within d.
func signalRecovery(a, b *node, from time.Time, d time.Duration) time.Duration {
	for deadline := from.Add(d); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := a.sig.Send(ctx, &signal.Message{Type: signal.TypeBye, To: b.NodeID(), Session: "faultlab-probe", Bye: &signal.Bye{Reason: "probe"}})
		cancel()
		if err == nil {
			return time.Since(from)
		}
	}
	return Never
}

func newIdentity(t *testing.T) *identity.Identity {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

type natsOption = nats.Option

func noRandomize() nats.Option { return nats.DontRandomize() }
