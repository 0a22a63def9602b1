package connect

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/nat"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/signal"
)

// nodeWith starts a node on a lab host like labServices.node, with the given host
// candidate addresses.
func (s *labServices) nodeWith(t *testing.T, h *netlab.Host, ips []netip.Addr) *Node {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sc, err := signal.Dial(ctx, s.sigURL, id, &signal.Options{DialContext: h.DialContext})
	if err != nil {
		t.Fatalf("%s: signaling: %v", h.Name, err)
	}
	t.Cleanup(func() { sc.Close() })
	n, err := Start(ctx, Config{Identity: id, Signal: sc, STUN: s.stun, Relay: s.relay, Net: h, DialContext: h.DialContext, Logger: labLogger(h.Name),
		LocalIPs: func() ([]netip.Addr, error) { return ips, nil }})
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// connectBoth connects a to b and returns both ends.
func connectBoth(t *testing.T, a, b *Node, opts Options) (ca, cb *Conn, err error) {
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
	if ca, err = a.Connect(ctx, b.NodeID(), opts); err != nil {
		return nil, nil, err
	}
	select {
	case cb = <-accepted:
	case <-ctx.Done():
		return nil, nil, errors.New("responder never accepted")
	}
	return ca, cb, nil
}

// waitMethod waits until c's method is want, or gives up after d.
func waitMethod(c *Conn, want Method, d time.Duration) Method {
	deadline := time.Now().Add(d)
	for c.Method() != want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	return c.Method()
}

// TestConnectIPv6KernelLab: two sites behind symmetric IPv4 NATs, which cannot be
// punched, with global IPv6 behind their routers' stateful firewalls. Their nodes end
// up on a direct IPv6 path (punched, the firewalls opened by the simultaneous pings),
// with and without a relay allowed; a node that offers no IPv6 candidates connects
// over the relay as before, and without a relay fails as a symmetric pair.
func TestConnectIPv6KernelLab(t *testing.T) {
	netlabtest.Need(t)
	link := netlab.Link{Delay: 20 * time.Millisecond}
	l := netlabtest.Start(t, netlab.Config{IPv6: true, Sites: []netlab.SiteConfig{
		{Name: "sym-1", Kind: netlab.KindSymmetric, Link: link},
		{Name: "sym-2", Kind: netlab.KindSymmetric, Link: link},
		{Name: "sym-3", Kind: netlab.KindSymmetric, Link: link},
		{Name: "seq", Kind: netlab.KindSymmetricSequential, Link: link},
		{Name: "pr", Kind: netlab.KindPortRestricted, Link: link},
	}})
	svc := startLabServices(t, l)
	var a, b, v4only, seq, pr *Node
	var wg sync.WaitGroup
	both := func(h *netlab.Host) []netip.Addr { return append(slices.Clone(h.IPs), h.IPv6...) }
	wg.Go(func() { a = svc.nodeWith(t, l.Site("sym-1").Host(), both(l.Site("sym-1").Host())) })
	wg.Go(func() { b = svc.nodeWith(t, l.Site("sym-2").Host(), both(l.Site("sym-2").Host())) })
	wg.Go(func() { v4only = svc.nodeWith(t, l.Site("sym-3").Host(), l.Site("sym-3").Host().IPs) })
	wg.Go(func() { seq = svc.nodeWith(t, l.Site("seq").Host(), both(l.Site("seq").Host())) })
	wg.Go(func() { pr = svc.nodeWith(t, l.Site("pr").Host(), both(l.Site("pr").Host())) })
	wg.Wait()
	if a == nil || b == nil || v4only == nil || seq == nil || pr == nil {
		t.Fatal("a node did not start")
	}
	if a.v6 == nil || b.v6 == nil {
		t.Fatal("nodes with a global IPv6 address have no IPv6 socket")
	}
	if v4only.v6 != nil {
		t.Fatal("a node without IPv6 candidates opened an IPv6 socket")
	}
	if p := nat.Strategy(a.Profile(), b.Profile()).Primary().Technique; p != nat.Relay {
		t.Fatalf("IPv4 plan for the symmetric pair: %v, want relay (the lab's NATs changed?)", p)
	}
	var v6cands int
	for _, c := range a.info().Candidates {
		if c.Type == signal.CandidateHost && c.IP.Is6() {
			v6cands++
			if c.Port != a.v6.LocalAddr().Port() || !slices.Contains(l.Site("sym-1").Host().IPv6, c.IP) {
				t.Errorf("IPv6 host candidate %v, want %v port %d", c.AddrPort(), l.Site("sym-1").Host().IPv6, a.v6.LocalAddr().Port())
			}
		}
	}
	if v6cands != 1 {
		t.Errorf("%d IPv6 host candidates published, want 1", v6cands)
	}

	directIPv6 := func(t *testing.T, c *Conn, peer netip.Addr) {
		t.Helper()
		if m := waitMethod(c, MethodPunched, 10*time.Second); m != MethodPunched {
			t.Fatalf("method %v, want punched over IPv6", m)
		}
		c.mu.Lock()
		direct, addr, down := c.direct, c.directAddr, c.directDown
		c.mu.Unlock()
		if direct != c.n.v6 || addr.Addr() != peer || down {
			t.Errorf("direct path %v (IPv6 socket: %v, down %v), want the IPv6 socket to %v", addr, direct == c.n.v6, down, peer)
		}
		if tech := c.Technique(); tech != nat.SimplePunch {
			t.Errorf("technique %v, want %v", tech, nat.SimplePunch)
		}
	}

	for _, tt := range []struct {
		name string
		opts Options
	}{
		{"relay allowed", Options{}},
		{"no relay", Options{NoRelay: true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ca, cb, err := connectBoth(t, a, b, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer ca.Close()
			directIPv6(t, ca, l.Site("sym-2").Host().IPv6[0])
			directIPv6(t, cb, l.Site("sym-1").Host().IPv6[0])
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			for i, dir := range [][2]*Conn{{ca, cb}, {cb, ca}} {
				if err := roundTrip(ctx, dir[0], dir[1], "over ipv6"); err != nil {
					t.Fatalf("direction %d: %v", i, err)
				}
			}
			if m := ca.Method(); m != MethodPunched {
				t.Errorf("method after the round trips: %v, want punched", m)
			}
			if s := ca.Stats(); s.Fallbacks != 0 {
				t.Errorf("%d fallbacks to the relay", s.Fallbacks)
			}
			t.Logf("%s: first path %v, IPv6 path after %v", tt.name, ca.Stats().FirstPath, ca.Stats().ToDirect)
		})
	}

	t.Run("IPv4 punch ends later", func(t *testing.T) {
		// The IPv4 plan can work here (port prediction from a fresh socket), but it
		// needs a round of signaling first, so the IPv6 path is usually up before it
		// and must stay once the IPv4 attempt has found its path, whose socket is let
		// go. Should IPv4 win the race on a side, that side keeps IPv4 instead; either
		// way each side ends with one direct path and no stray socket.
		plan := nat.Strategy(seq.Profile(), pr.Profile())
		if !plan.DirectCapable() {
			t.Fatalf("plan %v cannot punch IPv4", plan)
		}
		ca, cb, err := connectBoth(t, seq, pr, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer ca.Close()
		onIPv6 := 0
		for _, c := range []*Conn{ca, cb} {
			if m := waitMethod(c, MethodPunched, 10*time.Second); m != MethodPunched {
				t.Fatalf("method %v, want punched", m)
			}
			deadline := time.Now().Add(15 * time.Second)
			for {
				c.mu.Lock()
				settled := c.settled
				c.mu.Unlock()
				if settled || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			c.mu.Lock()
			settled, direct, extra, addr := c.settled, c.direct, c.extra, c.directAddr
			c.mu.Unlock()
			switch {
			case !settled:
				t.Fatal("the IPv4 plan never ended")
			case direct == c.n.v6:
				onIPv6++
				if extra != nil || !addr.Addr().Is6() {
					t.Errorf("on IPv6 to %v, yet the IPv4 attempt's socket is kept (%v)", addr, extra != nil)
				}
			case direct == nil || (direct != c.n.main && direct != extra) || !addr.Addr().Is4():
				t.Errorf("direct path to %v on an unknown socket", addr)
			}
			if m := c.Method(); m != MethodPunched {
				t.Errorf("method %v after the IPv4 plan ended, want punched", m)
			}
		}
		if onIPv6 == 0 {
			t.Log("IPv4 won the race on both sides this time: the IPv6-first order went unchecked")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for i, dir := range [][2]*Conn{{ca, cb}, {cb, ca}} {
			if err := roundTrip(ctx, dir[0], dir[1], "either path"); err != nil {
				t.Fatalf("direction %d: %v", i, err)
			}
		}
		t.Logf("plan %v: %d of 2 sides on IPv6, direct after %v", plan, onIPv6, ca.Stats().ToDirect)
	})

	t.Run("peer without IPv6", func(t *testing.T) {
		c, err := pair(t, a, v4only, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if m := waitMethod(c, MethodRelayed, 5*time.Second); m != MethodRelayed {
			t.Fatalf("method %v, want relayed", m)
		}
		time.Sleep(time.Second) // nothing upgrades it
		c.mu.Lock()
		checks := c.ipv6
		c.mu.Unlock()
		if m := c.Method(); m != MethodRelayed || checks != nil {
			t.Errorf("method %v, IPv6 checks %v: want relayed without IPv6 checks", m, checks != nil)
		}
		start := time.Now()
		_, err = a.Connect(context.Background(), v4only.NodeID(), Options{NoRelay: true})
		if !errors.Is(err, ErrSymmetricNAT) {
			t.Errorf("without a relay: %v, want ErrSymmetricNAT", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("ErrSymmetricNAT after %v: the failure should not wait for IPv6 checks that never ran", d)
		}
	})
}
