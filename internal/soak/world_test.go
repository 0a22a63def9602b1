package soak

import (
	"testing"

	"peerlink/connect/connecttest"
	"peerlink/signal/signaltest"
)

// world is the emulated internet the peers live in: connecttest's two-IP STUN server
// and TURN relay on natlab, with the test's rendezvous server on loopback. The World
// drops its references when it closes, at the test's end, so that what the soak
// measures after teardown is not the emulated internet kept alive by a cleanup.
type world = connecttest.World

func newWorld(t testing.TB, seed uint64, sig *signaltest.Server) *world {
	t.Helper()
	return connecttest.NewWorld(t, connecttest.Config{Seed: seed, SignalURL: sig.URL})
}
