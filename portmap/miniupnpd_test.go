package portmap

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/portmap/portmaptest"
	"peerlink/stun"
)

const (
	stunPort    = 3478
	stunAltPort = 3479
)

// startMiniupnpdLab builds a kernel lab with one symmetric NAT site whose router runs
// miniupnpd, and the RFC 5780 STUN server miniupnpd checks its public address with.
func startMiniupnpdLab(t *testing.T) *portmaptest.Router {
	t.Helper()
	netlabtest.Need(t)
	lab := netlabtest.Start(t, netlab.Config{Sites: []netlab.SiteConfig{{Kind: netlab.KindSymmetric}}})
	ip1, ip2 := lab.Server.IPs[0], lab.Server.IPs[1]
	s, err := stun.Listen(context.Background(), stun.Config{
		Listen: netip.AddrPortFrom(ip1, stunPort).String(), AltIP: ip2, AltPort: stunAltPort,
		Net: lab.Server, RateLimit: stun.RateLimit{Disabled: true}, SocketsPerAddr: 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background()) }()
	t.Cleanup(func() { s.Close(); <-served })
	return portmaptest.Start(t, lab, lab.Sites[0], netip.AddrPortFrom(ip1, stunPort))
}

// config is a portmap Config for the site's host.
func config(t *testing.T, r *portmaptest.Router, protos ...Protocol) Config {
	return Config{
		Gateway:   r.Gateway,
		Protocols: protos,
		Lifetime:  10 * time.Minute,
		Timeout:   2 * time.Second,
		Net:       r.Host,
		Dialer:    r.Host,
		Logger:    testLogger(t),
	}
}

// reaches sends a datagram from the lab server (from a fresh port, so no earlier
// conntrack entry helps it) to dst and reports whether sock received it, directly from
// the server.
func reaches(t *testing.T, r *portmaptest.Router, dst netip.AddrPort, sock net.PacketConn) bool {
	t.Helper()
	ctx := context.Background()
	src, err := r.Lab.Server.ListenPacket(ctx, "udp4", netip.AddrPortFrom(r.Lab.Server.IPs[0], 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	msg := fmt.Appendf(nil, "hello %v", time.Now().UnixNano())
	buf := make([]byte, 1500)
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if _, err := src.WriteTo(msg, net.UDPAddrFromAddrPort(dst)); err != nil {
			t.Fatal(err)
		}
		sock.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		for {
			n, from, err := sock.ReadFrom(buf)
			if err != nil {
				break
			}
			if !bytes.Equal(buf[:n], msg) {
				continue
			}
			if got := from.(*net.UDPAddr).AddrPort(); got != src.LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Errorf("datagram arrived from %v, want the server's %v", got, src.LocalAddr())
			}
			return true
		}
	}
	return false
}

func TestMiniupnpd(t *testing.T) {
	r := startMiniupnpdLab(t)
	ctx := context.Background()
	var gw netip.Addr
	if err := r.Host.Do(func() (err error) { gw, err = DefaultGateway(); return err }); err != nil || gw != r.Gateway {
		t.Errorf("DefaultGateway() in the host's namespace = %v, %v; want %v", gw, err, r.Gateway)
	}
	sock, err := r.Host.ListenPacket(ctx, "udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	port := uint16(sock.LocalAddr().(*net.UDPAddr).Port)
	// Without a mapping the symmetric NAT lets nothing in.
	if reaches(t, r, netip.AddrPortFrom(r.Site.PublicIP, port), sock) {
		t.Fatal("unsolicited datagram reached the host before any mapping")
	}

	for _, tc := range []struct {
		name    string
		protos  []Protocol
		maxV    int
		want    Protocol
		igdv1   bool // miniupnpd describes itself as IGDv1
		service string
		version int
	}{
		{"pcp", []Protocol{PCP}, 0, PCP, false, "", 0},
		{"nat-pmp", []Protocol{NATPMP}, 0, NATPMP, false, "", 0},
		{"upnp-igd2", []Protocol{UPnP}, 0, UPnP, false, wanIPService2, 2},
		{"upnp-igd2-as-v1", []Protocol{UPnP}, 1, UPnP, false, wanIPService2, 1},
		{"default-order", nil, 0, PCP, false, "", 0},
		{"upnp-igd1", []Protocol{UPnP}, 0, UPnP, true, wanIPService1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.igdv1 != r.IGDv1 {
				r.Stop()
				r.Start(t, tc.igdv1)
			}
			cfg := config(t, r, tc.protos...)
			cfg.UPnPMaxVersion = tc.maxV
			clk := clock.NewFake(time.Now())
			cfg.Clock = clk
			m, err := Map(ctx, cfg, port)
			if err != nil {
				t.Fatalf("Map: %v", err)
			}
			defer m.Close()
			if m.Protocol() != tc.want {
				t.Errorf("Protocol() = %v, want %v", m.Protocol(), tc.want)
			}
			if tc.service != "" {
				if got := m.c.(*upnpClient).svc; got.Type != tc.service || got.Version != tc.version {
					t.Errorf("UPnP service %q used as v%d, want %q as v%d", got.Type, got.Version, tc.service, tc.version)
				}
			}
			ext := m.External()
			if ext.Addr() != r.Site.PublicIP || ext.Port() == 0 {
				t.Fatalf("External() = %v, want the router's public address %v", ext, r.Site.PublicIP)
			}
			rules := r.Rules(t)
			if !strings.Contains(rules, fmt.Sprintf("%s:%d", r.Host.IP(), port)) {
				t.Errorf("router has no rule forwarding to %v:%d:\n%s", r.Host.IP(), port, rules)
			}
			if !reaches(t, r, ext, sock) {
				t.Fatalf("datagram from the server to %v did not reach the host\nrouter rules:\n%s", ext, rules)
			}

			// Half the lifetime later the mapping renews itself on the router.
			before := m.Expires()
			clk.Advance(cfg.Lifetime / 2)
			waitFor(t, func() bool { return m.Expires().After(before) || m.Err() != nil })
			if err := m.Err(); err != nil {
				t.Fatalf("renewal: %v", err)
			}
			if got := m.External(); got != ext {
				t.Errorf("renewal moved the mapping from %v to %v", ext, got)
			}
			if !reaches(t, r, m.External(), sock) {
				t.Fatal("after renewal a datagram from the server did not reach the host")
			}

			if err := m.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if err := m.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			if rules := r.Rules(t); strings.Contains(rules, fmt.Sprintf("%s:%d", r.Host.IP(), port)) {
				t.Errorf("after Close the router still forwards to the host:\n%s", rules)
			}
			if reaches(t, r, ext, sock) {
				t.Error("after Close a datagram to the old mapping still reached the host")
			}
		})
	}

	// The router allows mappings of ports 1024-65535 only, and UPnP's AddPortMapping
	// says no at once. (PCP and NAT-PMP requests for a forbidden port make miniupnpd try
	// every other external port first, for longer than a client waits; their refusal
	// codes are covered against the in-test servers.)
	t.Run("refused-upnp", func(t *testing.T) {
		if r.IGDv1 {
			r.Stop()
			r.Start(t, false)
		}
		cfg := config(t, r, UPnP)
		cfg.UPnPMaxVersion = 1
		m, err := Map(ctx, cfg, 80)
		if err == nil {
			m.Close()
			t.Fatalf("mapped port 80 at %v against the router's rules", m.External())
		}
		var re *ResultError
		if !errors.Is(err, ErrRefused) || !errors.As(err, &re) {
			t.Fatalf("error %v, want a ResultError wrapping ErrRefused", err)
		}
		t.Logf("refusal: %v", err)
	})
}
