package session

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"peerlink/connect"
)

// TestMetrics checks that a session's stats are exported per peer while it lives,
// and forgotten once it ends.
func TestMetrics(t *testing.T) {
	sa, _ := probedPair(t, 12)
	m := NewMetrics()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	m.Add(sa)
	time.Sleep(500 * time.Millisecond)

	series := func() map[string]float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			for _, s := range mf.GetMetric() {
				key := mf.GetName()
				for _, l := range s.GetLabel() {
					key += "," + l.GetName() + "=" + l.GetValue()
				}
				switch {
				case s.Gauge != nil:
					out[key] = s.Gauge.GetValue()
				case s.Counter != nil:
					out[key] = s.Counter.GetValue()
				}
			}
		}
		return out
	}
	got := series()
	peer := ",method=punched,peer=" + sa.Peer().String()
	for _, want := range []string{"peerlink_session_rtt_seconds" + peer, "peerlink_session_quality" + peer, "peerlink_session_bytes_total,direction=sent" + peer} {
		if got[want] <= 0 {
			t.Errorf("%s = %v, want > 0; all: %v", want, got[want], got)
		}
	}
	if got["peerlink_sessions,method=punched"] != 1 {
		t.Errorf("open sessions: %v", got)
	}
	sa.Close()
	<-sa.Done()
	for k := range series() {
		t.Errorf("after the session ended: %s still reported", k)
	}
}

// probedPair is two sessions over a punched path that probe it every 50 ms; they
// close when the test ends.
func probedPair(t *testing.T, seed uint64) (*Session, *Session) {
	t.Helper()
	w := newWorld(t, seed)
	a, b := w.node("a", "ei-pd-pp", connect.PathCheck{}), w.node("b", "ei-pd-pp", connect.PathCheck{})
	ca, cb := connPair(t, a, b, connect.MethodPunched)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var sb *Session
	var wg sync.WaitGroup
	wg.Go(func() { sb, _ = New(ctx, cb, Config{Identity: b.id, ProbeInterval: 50 * time.Millisecond}) })
	sa, err := New(ctx, ca, Config{Identity: a.id, ProbeInterval: 50 * time.Millisecond})
	wg.Wait()
	if err != nil || sb == nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sa.Close(); sb.Close() })
	return sa, sb
}
