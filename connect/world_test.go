package connect

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pion/turn/v4"

	"peerlink/identity"
	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/nettype"
	"peerlink/punch"
	"peerlink/signal/signaltest"
	"peerlink/stun"
)

var (
	stunIP1 = netip.MustParseAddr("203.0.113.10")
	stunIP2 = netip.MustParseAddr("203.0.113.11")
	turnIP  = netip.MustParseAddr("203.0.113.30")
)

// world is an emulated internet with a two-IP STUN server and a TURN relay, and a real
// rendezvous server on loopback that every node reaches (signaling is not what the NATs
// are in the way of).
type world struct {
	t     testing.TB
	net   *natlab.Network
	sig   *signaltest.Server
	stun  []string
	relay *RelayConfig
	mu    sync.Mutex
	nats  int
}

func newWorld(t testing.TB, seed uint64, sig *signaltest.Server) *world {
	t.Helper()
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

	// A TURN server on the emulated internet, allocating relayed addresses there too.
	th := n.AddPublicHost("turn", turnIP)
	pc, err := th.ListenPacket(context.Background(), "udp4", turnIP.String()+":3478")
	if err != nil {
		t.Fatal(err)
	}
	const user, pass, realm = "peer", "secret", "peerlink"
	key := turn.GenerateAuthKey(user, realm, pass)
	ts, err := turn.NewServer(turn.ServerConfig{
		Realm: realm,
		AuthHandler: func(u, r string, _ net.Addr) ([]byte, bool) {
			return key, u == user
		},
		PacketConnConfigs: []turn.PacketConnConfig{{PacketConn: pc, RelayAddressGenerator: labRelays{th}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ts.Close() })
	w.relay = &RelayConfig{Server: turnIP.String() + ":3478", Username: user, Password: pass}
	return w
}

// labRelays allocates TURN relayed addresses on an emulated host.
type labRelays struct{ h *natlab.Host }

func (labRelays) Validate() error { return nil }
func (g labRelays) AllocatePacketConn(network string, port int) (net.PacketConn, net.Addr, error) {
	c, err := g.h.ListenPacket(context.Background(), "udp4", fmt.Sprintf("%s:%d", turnIP, port))
	if err != nil {
		return nil, nil, err
	}
	return c, c.LocalAddr(), nil
}
func (labRelays) AllocateConn(string, int) (net.Conn, net.Addr, error) {
	return nil, nil, fmt.Errorf("no TCP relays in the emulator")
}

// nodeOpts shape one test node.
type nodeOpts struct {
	typ     nat.Type
	open    bool // a public host, no NAT
	detect  bool // profile the NAT for real instead of using typ
	noRelay bool
	loss    float64 // on the NAT's uplink
	// wrap, when set, wraps the node's network (to cut paths in tests).
	wrap      func(nettype.PacketListener) nettype.PacketListener
	pathCheck PathCheck
	lan       *LANConfig
}

// node starts a node behind a new NAT of the given type.
func (w *world) node(name string, o nodeOpts) *Node {
	t := w.t
	t.Helper()
	w.mu.Lock()
	w.nats++
	i := w.nats
	w.mu.Unlock()
	var h *natlab.Host
	var profile *nat.Profile
	if o.open {
		h = w.net.AddPublicHost(name, netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}))
		profile = &nat.Profile{Open: true, Mapping: nat.MappingEI, Filtering: nat.FilteringEI, Allocation: nat.AllocationPP}
	} else {
		r := w.net.AddNAT(natlab.NATConfig{Name: name + "-nat", Type: o.typ, PublicIP: netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}),
			Uplink: natlab.Link{Loss: o.loss}})
		h = r.AddHost(name, netip.AddrFrom4([4]byte{192, 168, byte(i), 2}))
		profile = &nat.Profile{Mapping: o.typ.Mapping, Filtering: o.typ.Filtering, Allocation: o.typ.Allocation, PortDelta: 1}
	}
	if o.detect {
		profile = nil
	}
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	sc := w.sig.DialAs(t, id, nil)
	var netw nettype.PacketListener = h
	if o.wrap != nil {
		netw = o.wrap(h)
	}
	cfg := Config{
		Identity: id, Signal: sc, STUN: w.stun, Net: netw, Profile: profile, PathCheck: o.pathCheck, LAN: o.lan,
		LocalIPs: func() ([]netip.Addr, error) { return h.Addrs(), nil },
		Punch:    punch.Config{Pace: time.Millisecond, ProbeInterval: time.Millisecond, CheckInterval: 20 * time.Millisecond},
	}
	if !o.noRelay {
		cfg.Relay = w.relay
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// pair connects a to b and checks datagrams flow both ways. It returns a's Conn.
func pair(t testing.TB, a, b *Node, opts Options) (*Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	accepted := make(chan *Conn, 1)
	go func() {
		c, err := b.Accept(ctx)
		if err == nil {
			accepted <- c
		}
	}()
	ca, err := a.Connect(ctx, b.NodeID(), opts)
	if err != nil {
		return nil, err
	}
	var cb *Conn
	select {
	case cb = <-accepted:
	case <-ctx.Done():
		return nil, fmt.Errorf("responder never accepted")
	}
	if err := roundTrip(ctx, ca, cb, "ping"); err != nil {
		return nil, fmt.Errorf("a→b: %w", err)
	}
	if err := roundTrip(ctx, cb, ca, "pong"); err != nil {
		return nil, fmt.Errorf("b→a: %w", err)
	}
	return ca, nil
}

// roundTrip sends msg from one end until the other receives it (datagrams may be lost
// while a path settles).
func roundTrip(ctx context.Context, from, to *Conn, msg string) error {
	got := make(chan error, 1)
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for {
			b, err := to.Recv(rctx)
			if err != nil {
				got <- err
				return
			}
			if string(b) == msg {
				got <- nil
				return
			}
		}
	}()
	for {
		from.Send([]byte(msg))
		select {
		case err := <-got:
			return err
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
