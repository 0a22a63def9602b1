package faultlab

import (
	"context"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/netlab"
	"peerlink/signal"
)

// rendezvousReconnect bounds how long after the restart each node is published on the
// restarted server: a backoff of at most 500 ms (the Reconnector's default) and a dial
// and publication of well under 100 ms in the lab; the rest is room for a loaded
// two-core machine under the race detector.
const rendezvousReconnect = 3 * time.Second

// keepSignal reconnects nd to the lab's rendezvous server whenever its connection ends
// (a Reconnector with its defaults: 500 ms backoff, doubling, jittered), reporting each
// reconnection on the returned channel.
func keepSignal(t *testing.T, w *world, nd *node) (*Reconnector, <-chan Reconnection) {
	t.Helper()
	ch := make(chan Reconnection, 4)
	r, err := Reconnect(nd.Node, nd.sig, ReconnectConfig{
		Dial: func(ctx context.Context) (*signal.Client, error) {
			return signal.Dial(ctx, w.rv.URL(), nd.id, &signal.Options{DialContext: nd.host.DialContext})
		},
		OnReconnect: func(r Reconnection) {
			select {
			case ch <- r:
			default:
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	// Registered after the node's Close: runs before it. The node's goodbyes then fail
	// at once on the closed client rather than going out, which no test here needs.
	t.Cleanup(func() { r.Close() })
	return r, ch
}

// TestRendezvousRestart restarts the rendezvous server (close, listen again on the same
// port) while a punched and a relayed transfer run, and each node reconnects the way an
// agent does: a Reconnector dials again and hands the node the new client
// (connect.Node.SetSignal), keeping identity and connections. Established connections
// need no signaling: both transfers complete intact without a stall of 2 s
// (unaffectedStall) and carry on after the reconnection. Every node is published again within 3 s of the restart,
// and new connections work in both directions between the same nodes.
func TestRendezvousRestart(t *testing.T) {
	t.Parallel()
	w := startWorld(t, true,
		netlab.SiteConfig{Name: "pr-1", Kind: netlab.KindPortRestricted}, netlab.SiteConfig{Name: "pr-2", Kind: netlab.KindPortRestricted},
		netlab.SiteConfig{Name: "sym-1", Kind: netlab.KindSymmetric}, netlab.SiteConfig{Name: "sym-2", Kind: netlab.KindSymmetric})
	names := []string{"pr-1", "pr-2", "sym-1", "sym-2"}
	n := w.nodes(t, names...)
	events := map[string]<-chan Reconnection{}
	for _, name := range names {
		_, events[name] = keepSignal(t, w, n[name])
	}
	pa, pb := pair(t, n["pr-1"], n["pr-2"], connect.MethodPunched)
	ra, rb := pair(t, n["sym-1"], n["sym-2"], connect.MethodRelayed)
	// 4 s at 256 KiB/s, the restart after 1 s: the transfers run on for a good while
	// after the nodes reconnected.
	const rate = 256 << 10
	punched := startFlow("punched", pa, pb, 4*rate, rate, 3)
	relayed := startFlow("relayed", ra, rb, 4*rate, rate, 4)
	time.Sleep(time.Second)

	restarted := time.Now()
	w.rv.restart()
	t.Logf("rendezvous server closed and listening again on %s after %v", w.rv.addr, time.Since(restarted).Round(time.Millisecond))
	var rows []Row
	var slowest time.Duration
	var allUp time.Time
	for _, name := range names {
		select {
		case r := <-events[name]:
			took := r.Up.Sub(restarted)
			slowest = max(slowest, took)
			if r.Up.After(allUp) {
				allUp = r.Up
			}
			t.Logf("%s: connection seen lost %v after the restart, published again %v after it (%d attempts)", name,
				r.Lost.Sub(restarted).Round(time.Millisecond), took.Round(time.Millisecond), r.Attempts)
		case <-time.After(time.Until(restarted.Add(10 * time.Second))):
			t.Fatalf("%s did not reconnect within 10 s of the restart", name)
		}
	}
	rows = append(rows, Row{Fault: "rendezvous restart", Survived: "4 nodes re-published, same identity", Recovery: slowest,
		Note: "slowest; Reconnector: 500 ms jittered backoff, SetSignal"})

	for _, f := range []*flow{punched, relayed} {
		err := f.wait(30 * time.Second)
		gap := f.meter.MaxGap()
		rows = append(rows, Row{Fault: "rendezvous restart", Survived: survived(f.name+" transfer", err == nil && gap.Len() < unaffectedStall), Recovery: 0,
			Note: "longest stall " + gap.Len().Round(time.Millisecond).String()})
		if err != nil {
			t.Errorf("%s transfer across the rendezvous restart: %v", f.name, err)
		}
		if gap.Len() >= unaffectedStall {
			t.Errorf("%s transfer stalled %v, want < %v", f.name, gap.Len(), unaffectedStall)
		}
		if !f.meter.Last().After(allUp) {
			t.Errorf("%s transfer ended before the nodes reconnected: the test did not cover the switch", f.name)
		}
	}

	for _, tt := range []struct {
		a, b   string
		method connect.Method
	}{
		{"pr-1", "pr-2", connect.MethodPunched}, {"pr-2", "pr-1", connect.MethodPunched},
		{"sym-1", "sym-2", connect.MethodRelayed}, {"sym-2", "sym-1", connect.MethodRelayed},
	} {
		start := time.Now()
		ca, cb, err := connectPair(context.Background(), n[tt.a], n[tt.b], 10*time.Second)
		ok := err == nil && ping(ca, cb) && ping(cb, ca)
		rows = append(rows, Row{Fault: "rendezvous restart", Survived: survived("new Connect "+tt.a+" → "+tt.b, ok), Recovery: orNever(ok, time.Since(start)),
			Note: "same nodes on their new clients: Connect and a datagram each way"})
		if err == nil {
			ca.Close()
			cb.Close()
		}
		if !ok {
			t.Errorf("new connection %s → %s after the restart: %v", tt.a, tt.b, err)
		}
	}
	t.Logf("\n%s", Table(rows))
	if slowest > rendezvousReconnect {
		t.Errorf("reconnecting took up to %v, want within %v (a 500 ms backoff and a dial)", slowest, rendezvousReconnect)
	}
}
