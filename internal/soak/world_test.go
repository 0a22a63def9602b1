package soak

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/pion/turn/v4"

	"peerlink/connect"
	"peerlink/natlab"
	"peerlink/signal/signaltest"
	"peerlink/stun"
)

var (
	stunIP1 = netip.MustParseAddr("203.0.113.10")
	stunIP2 = netip.MustParseAddr("203.0.113.11")
	turnIP  = netip.MustParseAddr("203.0.113.30")
)

// world is the emulated internet the peers live in: a two-IP STUN server and a TURN
// relay on natlab, and a real rendezvous server on loopback (signaling is not what the
// NATs are in the way of). Everything it starts is stopped by t's cleanups.
type world struct {
	// closers stop what newWorld started, last first. They are not t.Cleanups: a
	// test keeps its cleanups reachable until it ends, and with them the whole
	// emulated internet, which would read as a leak in the heap after teardown.
	closers []func()
	net     *natlab.Network
	sig     *signaltest.Server
	stun    []string
	relay   *connect.RelayConfig
}

func newWorld(t testing.TB, seed uint64, sig *signaltest.Server) *world {
	t.Helper()
	n := natlab.New(natlab.Config{Seed: seed})
	w := &world{net: n, sig: sig}
	t.Cleanup(w.close)
	w.closers = append(w.closers, func() { n.Close() })

	h := n.AddPublicHost("stun", stunIP1, stunIP2)
	s, err := stun.Listen(context.Background(), stun.Config{Listen: stunIP1.String() + ":3478", AltIP: stunIP2, AltPort: 3479, Net: h, RateLimit: stun.RateLimit{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		s.Serve(context.Background())
	}()
	w.closers = append(w.closers, func() {
		s.Close()
		<-served
	})
	w.stun = []string{stunIP1.String() + ":3478"}

	th := n.AddPublicHost("turn", turnIP)
	pc, err := th.ListenPacket(context.Background(), "udp4", turnIP.String()+":3478")
	if err != nil {
		t.Fatal(err)
	}
	const user, pass, realm = "peer", "secret", "peerlink"
	key := turn.GenerateAuthKey(user, realm, pass)
	ts, err := turn.NewServer(turn.ServerConfig{
		Realm: realm,
		AuthHandler: func(u, _ string, _ net.Addr) ([]byte, bool) {
			return key, u == user
		},
		PacketConnConfigs: []turn.PacketConnConfig{{PacketConn: pc, RelayAddressGenerator: labRelays{th}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	w.closers = append(w.closers, func() { ts.Close() })
	w.relay = &connect.RelayConfig{Server: turnIP.String() + ":3478", Username: user, Password: pass}
	return w
}

// labRelays allocates TURN relayed addresses on an emulated host.
type labRelays struct{ h *natlab.Host }

func (labRelays) Validate() error { return nil }
func (g labRelays) AllocatePacketConn(_ string, port int) (net.PacketConn, net.Addr, error) {
	c, err := g.h.ListenPacket(context.Background(), "udp4", fmt.Sprintf("%s:%d", turnIP, port))
	if err != nil {
		return nil, nil, err
	}
	return c, c.LocalAddr(), nil
}
func (labRelays) AllocateConn(string, int) (net.Conn, net.Addr, error) {
	return nil, nil, fmt.Errorf("no TCP relays in the emulator")
}

// close stops the world and drops every reference to it.
func (w *world) close() {
	for i := len(w.closers) - 1; i >= 0; i-- {
		w.closers[i]()
	}
	*w = world{}
}
