package netlab

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// listen6 opens a UDP socket on h's IPv6 address.
func listen6(t *testing.T, h *Host) net.PacketConn {
	t.Helper()
	if len(h.IPv6) == 0 {
		t.Fatalf("%s has no IPv6 address", h.Name)
	}
	c, err := h.ListenPacket(context.Background(), "udp6", netip.AddrPortFrom(h.IPv6[0], 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// expect reports whether c receives want within wait.
func expect(t *testing.T, c net.PacketConn, want string, wait time.Duration) bool {
	t.Helper()
	buf := make([]byte, 1500)
	deadline := time.Now().Add(wait)
	for {
		c.SetReadDeadline(deadline)
		k, _, err := c.ReadFrom(buf)
		if err != nil {
			return false
		}
		if string(buf[:k]) == want {
			return true
		}
	}
}

func send(t *testing.T, c net.PacketConn, to net.PacketConn, msg string) {
	t.Helper()
	if _, err := c.WriteTo([]byte(msg), to.LocalAddr()); err != nil {
		t.Fatalf("send %q to %v: %v", msg, to.LocalAddr(), err)
	}
}

// TestIPv6 checks the IPv6 lab: addresses and routes, the server reachable from
// every site that lets UDP out, home routers that forward without translation but
// drop what no host asked for, the full cone's open endpoints, and IPv4 NAT behaviour
// unchanged next to it.
func TestIPv6(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{IPv6: true, Sites: []SiteConfig{
		{Name: "a", Kind: KindPortRestricted},
		{Name: "b", Kind: KindSymmetric, Hosts: 2},
		{Name: "fc", Kind: KindFullCone},
		{Name: "open", Kind: KindNone},
		{Name: "cg", Kind: KindCGNAT},
		{Name: "blk", Kind: KindUDPBlocked},
		{Name: "slow", Kind: KindRestrictedCone, Link: Link{Delay: 20 * time.Millisecond}},
	}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	if len(l.Server.IPv6) != 2 || l.Server.IPv6[0] != ServerIPv6[0] || l.Server.IPv6[1] != ServerIPv6[1] {
		t.Fatalf("server IPv6 %v, want %v", l.Server.IPv6, ServerIPv6)
	}
	for _, s := range l.Sites {
		if !s.IPv6Prefix.IsValid() || s.IPv6Prefix.Bits() != 64 {
			t.Errorf("site %s: prefix %v, want a /64", s.Name, s.IPv6Prefix)
		}
		for _, h := range s.Hosts {
			if len(h.IPv6) != 1 || !s.IPv6Prefix.Contains(h.IPv6[0]) || !h.IPv6[0].IsGlobalUnicast() {
				t.Errorf("%s: IPv6 %v, want one global address in %v", h.Name, h.IPv6, s.IPv6Prefix)
			}
			if len(h.IPs) != 1 || !h.IP().Is4() {
				t.Errorf("%s: IPs %v, want its one IPv4 address", h.Name, h.IPs)
			}
		}
	}

	// The server echoes on both of its IPv6 addresses.
	echo := [2]net.PacketConn{}
	for i, a := range l.Server.IPv6 {
		c, err := l.Server.ListenPacket(ctx, "udp6", netip.AddrPortFrom(a, 7000).String())
		if err != nil {
			t.Fatal(err)
		}
		echo[i] = c
		go func() {
			buf := make([]byte, 1500)
			for {
				k, from, err := c.ReadFrom(buf)
				if err != nil {
					return
				}
				c.WriteTo(buf[:k], from)
			}
		}()
	}
	t.Cleanup(func() { echo[0].Close(); echo[1].Close() })

	t.Run("server", func(t *testing.T) {
		for _, tt := range []struct {
			site string
			want bool
		}{
			{"a", true}, {"b", true}, {"fc", true}, {"open", true}, {"cg", true}, {"slow", true},
			{"blk", false}, // UDP does not get out, whatever the IP version
		} {
			h := l.Site(tt.site).Host()
			c := listen6(t, h)
			got := false
			for range 3 {
				if _, err := c.WriteTo([]byte("hello"), echo[0].LocalAddr()); err != nil {
					t.Fatal(err)
				}
				if got = expect(t, c, "hello", 300*time.Millisecond); got {
					break
				}
			}
			if got != tt.want {
				t.Errorf("%s: UDP echo from the server over IPv6: %v, want %v", tt.site, got, tt.want)
			}
		}
		// TCP to port 443 is what the UDP-blocking firewall lets out.
		ln, err := l.Server.Listen(ctx, "tcp6", netip.AddrPortFrom(l.Server.IPv6[1], 443).String())
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
		defer dcancel()
		tc, err := l.Site("blk").Host().DialContext(dctx, "tcp6", netip.AddrPortFrom(l.Server.IPv6[1], 443).String())
		if err != nil {
			t.Errorf("blk: TCP 443 to the server over IPv6: %v", err)
		} else {
			tc.Close()
		}
	})

	t.Run("unsolicited", func(t *testing.T) {
		// A datagram from the server to a port that has sent nothing out.
		for _, tt := range []struct {
			site string
			want bool
		}{
			{"a", false}, {"b", false}, {"fc", false}, {"cg", false}, {"slow", false}, {"blk", false},
			{"open", true}, // no firewall in front of a public host
		} {
			c := listen6(t, l.Site(tt.site).Host())
			send(t, echo[1], c, "unasked")
			if got := expect(t, c, "unasked", 200*time.Millisecond); got != tt.want {
				t.Errorf("%s: unsolicited datagram delivered %v, want %v", tt.site, got, tt.want)
			}
		}
	})

	t.Run("simultaneous open", func(t *testing.T) {
		for _, tt := range []struct{ a, b string }{{"a", "b"}, {"cg", "slow"}, {"b", "fc"}} {
			ca, cb := listen6(t, l.Site(tt.a).Host()), listen6(t, l.Site(tt.b).Host())
			send(t, ca, cb, "first")
			if expect(t, cb, "first", 200*time.Millisecond) {
				t.Errorf("%s → %s: the first datagram passed %s's firewall", tt.a, tt.b, tt.b)
			}
			send(t, cb, ca, "second")
			if !expect(t, ca, "second", time.Second) {
				t.Errorf("%s → %s: the answer was dropped although %s had sent", tt.b, tt.a, tt.a)
			}
			send(t, ca, cb, "third")
			if !expect(t, cb, "third", time.Second) {
				t.Errorf("%s → %s: dropped after both sent", tt.a, tt.b)
			}
		}
		// Hosts of one site reach each other through their router.
		b := l.Site("b")
		c0, c1 := listen6(t, b.Hosts[0]), listen6(t, b.Hosts[1])
		send(t, c0, c1, "neighbour")
		if !expect(t, c1, "neighbour", time.Second) {
			t.Error("b/h0 → b/h1 over IPv6: dropped")
		}
	})

	t.Run("full cone", func(t *testing.T) {
		// Once the endpoint sent anything out, anyone may send to it; another port of
		// the same host stays closed.
		c := listen6(t, l.Site("fc").Host())
		closed := listen6(t, l.Site("fc").Host())
		send(t, c, echo[0], "open up")
		if !expect(t, c, "open up", time.Second) {
			t.Fatal("no echo from the server")
		}
		stranger := listen6(t, l.Site("open").Host())
		send(t, stranger, c, "stranger")
		if !expect(t, c, "stranger", time.Second) {
			t.Error("full cone: a stranger's datagram to an open endpoint was dropped")
		}
		send(t, stranger, closed, "stranger")
		if expect(t, closed, "stranger", 200*time.Millisecond) {
			t.Error("full cone: a stranger's datagram to an endpoint that never sent got through")
		}
	})

	t.Run("cut", func(t *testing.T) {
		a := l.Site("a")
		c := listen6(t, a.Host())
		if err := a.Cut(ctx, l.Server.IPv6[0]); err != nil {
			t.Fatal(err)
		}
		send(t, c, echo[0], "cut")
		if expect(t, c, "cut", 300*time.Millisecond) {
			t.Error("datagram to a cut IPv6 address got through")
		}
		if err := a.Cut(ctx); err != nil {
			t.Fatal(err)
		}
		send(t, c, echo[0], "healed")
		if !expect(t, c, "healed", time.Second) {
			t.Error("no echo after healing the cut")
		}
	})

	t.Run("ipv4 unchanged", func(t *testing.T) {
		checks, err := SelfTest(ctx, l, SelfTestOptions{Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range checks {
			if !c.OK() {
				t.Errorf("site %s in an IPv6 lab: %v", c.Site, c.Problems)
			}
		}
	})
}

// The zero Config keeps IPv6 off everywhere.
func TestIPv4OnlyHasNoIPv6(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{Sites: []SiteConfig{{Kind: KindPortRestricted}, {Kind: KindNone}}})
	for _, h := range []*Host{l.Server, l.Sites[0].Host(), l.Sites[1].Host(), l.Sites[0].Routers[0]} {
		if len(h.IPv6) != 0 {
			t.Errorf("%s: IPv6 %v in an IPv4-only lab", h.Name, h.IPv6)
		}
		out, err := h.Run(context.Background(), "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6")
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != "1\n" {
			t.Errorf("%s: disable_ipv6 = %q, want 1", h.Name, out)
		}
	}
	if l.Sites[0].IPv6Prefix.IsValid() {
		t.Errorf("site prefix %v in an IPv4-only lab", l.Sites[0].IPv6Prefix)
	}
}
