package connect

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/internal/emuworld"
	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/nettype"
	"peerlink/punch"
	"peerlink/signal/signaltest"
)

// The servers' addresses in the emulated world.
var (
	stunIP1 = emuworld.STUNIP1
	stunIP2 = emuworld.STUNIP2
	turnIP  = emuworld.TURNIP
)

// world is the emulated internet of internal/emuworld, with the rendezvous server the
// test shares among its worlds. (connect/connecttest builds nodes in the same world,
// but this package's own tests cannot import it.)
type world struct {
	t   testing.TB
	w   *emuworld.World
	sig *signaltest.Server
	// relay is what new nodes relay through; tests may point it elsewhere.
	relay *RelayConfig
}

func newWorld(t testing.TB, seed uint64, sig *signaltest.Server) *world {
	t.Helper()
	w, err := emuworld.Start(emuworld.Config{Seed: seed, SignalURL: sig.URL})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	return &world{t: t, w: w, sig: sig,
		relay: &RelayConfig{Server: w.TURN, Username: emuworld.TURNUser, Password: emuworld.TURNPassword}}
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
	refresh   time.Duration        // Config.Refresh
	site      func(*emuworld.Site) // told the node's site (its NAT, to rebind it)
}

// node starts a node behind a new NAT of the given type.
func (w *world) node(name string, o nodeOpts) *Node {
	t := w.t
	t.Helper()
	spec := o.typ.String()
	if o.open {
		spec = "open"
	}
	site, err := w.w.AddSite(name, emuworld.SiteConfig{NAT: spec, Link: natlab.Link{Loss: o.loss}})
	if err != nil {
		t.Fatal(err)
	}
	if o.site != nil {
		o.site(site)
	}
	h := site.Host
	profile := &site.Profile
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
		Identity: id, Signal: sc, STUN: w.w.STUN, Net: netw, Profile: profile, PathCheck: o.pathCheck, LAN: o.lan, Refresh: o.refresh,
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

// connected connects a to b and returns both ends; they close when the test ends.
func connected(t testing.TB, a, b *Node) (*Conn, *Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	accepted := make(chan *Conn, 1)
	go func() {
		c, _ := b.Accept(ctx)
		accepted <- c
	}()
	ca, err := a.Connect(ctx, b.NodeID(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	cb := <-accepted
	if cb == nil {
		t.Fatal("not accepted")
	}
	t.Cleanup(func() { ca.Close(); cb.Close() })
	return ca, cb
}

// bothMethod waits until both ends use m, at most within, and says how long it took.
func bothMethod(t testing.TB, ca, cb *Conn, m Method, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for ca.Method() != m || cb.Method() != m {
		if time.Since(start) > within {
			t.Fatalf("after %v: %v / %v, want %v on both", within, ca.Method(), cb.Method(), m)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}
