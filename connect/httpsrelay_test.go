package connect

import (
	"testing"

	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestHTTPSRelay: two nodes behind symmetric NATs with no TURN relay (none configured,
// or one that is down) still connect, through the rendezvous server's relay, and say
// so; datagrams flow both ways.
func TestHTTPSRelay(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	for i, tc := range []struct {
		name      string
		deadRelay bool
	}{{"no TURN relay", false}, {"TURN relay down", true}} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t, uint64(120+i), sig)
			o := nodeOpts{typ: mustType(t, "pd-pd-rd"), noRelay: !tc.deadRelay}
			if tc.deadRelay {
				w.relay = &RelayConfig{Server: "192.0.2.99:3478", Username: "u", Password: "p"}
			}
			a, b := w.node("a", o), w.node("b", o)
			ca, err := pair(t, a, b, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if ca.Method() != MethodRelayedHTTPS {
				t.Fatalf("method %v, want %v", ca.Method(), MethodRelayedHTTPS)
			}
			if !ca.Method().Relayed() {
				t.Error("relayed-https does not count as relayed")
			}
			if ca.Stats().ToDirect != 0 {
				t.Errorf("ToDirect %v for a relayed connection", ca.Stats().ToDirect)
			}
			// Not allowed to relay: no relay of either kind.
			if _, err := pair(t, a, b, Options{NoRelay: true}); err == nil {
				t.Error("connected with NoRelay between two symmetric NATs")
			}
		})
	}
}
