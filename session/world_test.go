package session

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/turn/v4"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/punch"
	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/stun"
)

// The emulated internet of connect's tests: a two-IP STUN server, a TURN relay, NATs
// from natlab, and a real rendezvous server on loopback.
var (
	stunIP1 = netip.MustParseAddr("203.0.113.10")
	stunIP2 = netip.MustParseAddr("203.0.113.11")
	turnIP  = netip.MustParseAddr("203.0.113.30")
)

type world struct {
	t     testing.TB
	net   *natlab.Network
	sig   *signaltest.Server
	stun  []string
	relay *connect.RelayConfig
	nats  atomic.Int32
}

func newWorld(t testing.TB, seed uint64) *world {
	t.Helper()
	sig := signaltest.Start(t, signal.Config{}, false)
	n := natlab.New(natlab.Config{Seed: seed})
	t.Cleanup(func() { n.Close() })
	w := &world{t: t, net: n, sig: sig}

	h := n.AddPublicHost("stun", stunIP1, stunIP2)
	s, err := stun.Listen(context.Background(), stun.Config{Listen: stunIP1.String() + ":3478", AltIP: stunIP2, AltPort: 3479, Net: h, RateLimit: stun.RateLimit{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(context.Background())
	t.Cleanup(func() { s.Close() })
	w.stun = []string{stunIP1.String() + ":3478"}

	th := n.AddPublicHost("turn", turnIP)
	pc, err := th.ListenPacket(context.Background(), "udp4", turnIP.String()+":3478")
	if err != nil {
		t.Fatal(err)
	}
	const user, pass, realm = "peer", "secret", "peerlink"
	key := turn.GenerateAuthKey(user, realm, pass)
	ts, err := turn.NewServer(turn.ServerConfig{
		Realm:             realm,
		AuthHandler:       func(u, _ string, _ net.Addr) ([]byte, bool) { return key, u == user },
		PacketConnConfigs: []turn.PacketConnConfig{{PacketConn: pc, RelayAddressGenerator: labRelays{th}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ts.Close() })
	w.relay = &connect.RelayConfig{Server: turnIP.String() + ":3478", Username: user, Password: pass}
	return w
}

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

// node is a test node: connect's Node, its identity, and a switch that cuts every path
// but the ones to the STUN and TURN servers, as a NAT that lost the peer's mapping.
type node struct {
	*connect.Node
	id  *identity.Identity
	cut *cutNet
}

// node starts a node behind a new NAT of type typ ("ei-pd-pp", ...).
func (w *world) node(name, typ string, pc connect.PathCheck) *node {
	t := w.t
	t.Helper()
	ty, err := nat.ParseType(typ)
	if err != nil {
		t.Fatal(err)
	}
	i := w.nats.Add(1)
	r := w.net.AddNAT(natlab.NATConfig{Name: name + "-nat", Type: ty, PublicIP: netip.AddrFrom4([4]byte{198, 51, 100, byte(i)})})
	h := r.AddHost(name, netip.AddrFrom4([4]byte{192, 168, byte(i), 2}))
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	cn := &cutNet{h: h, keep: []netip.Addr{stunIP1, stunIP2, turnIP}}
	sc := w.sig.DialAs(t, id, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := connect.Start(ctx, connect.Config{
		Identity: id, Signal: sc, STUN: w.stun, Net: cn, Relay: w.relay,
		Profile:   &nat.Profile{Mapping: ty.Mapping, Filtering: ty.Filtering, Allocation: ty.Allocation, PortDelta: 1},
		LocalIPs:  func() ([]netip.Addr, error) { return h.Addrs(), nil },
		Punch:     punch.Config{Pace: time.Millisecond, ProbeInterval: time.Millisecond, CheckInterval: 20 * time.Millisecond},
		PathCheck: pc,
	})
	if err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() { n.Close() })
	if err := n.WaitRelay(ctx); err != nil {
		t.Fatalf("%s: relay: %v", name, err)
	}
	return &node{Node: n, id: id, cut: cn}
}

// connPair connects a to b and returns both ends, once the path is method (or the
// wait for it timed out, which fails the test).
func connPair(t testing.TB, a, b *node, method connect.Method) (*connect.Conn, *connect.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	accepted := make(chan *connect.Conn, 1)
	go func() {
		c, err := b.Accept(ctx)
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	ca, err := a.Connect(ctx, b.NodeID(), connect.Options{})
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	cb := <-accepted
	if cb == nil {
		t.Fatal("the responder never accepted")
	}
	waitMethod(t, ca, method, 10*time.Second)
	waitMethod(t, cb, method, 10*time.Second)
	return ca, cb
}

func waitMethod(t testing.TB, c *connect.Conn, m connect.Method, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for c.Method() != m {
		if time.Since(start) > within {
			t.Fatalf("method %v after %v, want %v", c.Method(), within, m)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// sessionPair starts a session on both connections: a as client, b as server.
func sessionPair(t testing.TB, ca, cb *connect.Conn, ida, idb *identity.Identity) (*Session, *Session) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var sb *Session
	var errB error
	var wg sync.WaitGroup
	wg.Go(func() { sb, errB = New(ctx, cb, Config{Identity: idb}) })
	sa, err := New(ctx, ca, Config{Identity: ida})
	wg.Wait()
	if err != nil || errB != nil {
		t.Fatalf("sessions: client %v, server %v", err, errB)
	}
	t.Cleanup(func() { sa.Close(); sb.Close() })
	return sa, sb
}

// cutNet is a natlab host whose sockets can be cut off from everything but keep.
type cutNet struct {
	h    *natlab.Host
	keep []netip.Addr
	on   atomic.Bool
	all  atomic.Bool // cut keep too: the node's UDP is gone altogether
}

func (c *cutNet) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	pc, err := c.h.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return &cutConn{PacketConn: pc, n: c}, nil
}

func (c *cutNet) blocked(a net.Addr) bool {
	if c.all.Load() {
		return true
	}
	if !c.on.Load() {
		return false
	}
	u, ok := a.(*net.UDPAddr)
	if !ok {
		return false
	}
	ip := u.AddrPort().Addr().Unmap()
	for _, k := range c.keep {
		if ip == k {
			return false
		}
	}
	return true
}

type cutConn struct {
	net.PacketConn
	n *cutNet
}

func (c *cutConn) WriteTo(b []byte, a net.Addr) (int, error) {
	if c.n.blocked(a) {
		return len(b), nil
	}
	return c.PacketConn.WriteTo(b, a)
}

func (c *cutConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, a, err := c.PacketConn.ReadFrom(b)
		if err != nil || !c.n.blocked(a) {
			return n, a, err
		}
	}
}
