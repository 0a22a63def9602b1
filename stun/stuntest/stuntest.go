// Package stuntest starts real peerlink STUN servers on loopback for tests.
package stuntest

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"peerlink/stun"
)

// AltIP is the second loopback address RFC 5780 servers use. Linux routes all of
// 127.0.0.0/8 to lo, so it needs no setup there.
var AltIP = netip.MustParseAddr("127.0.0.2")

// Options configure Start.
type Options struct {
	// RFC5780 adds AltIP and an alternate port, so that CHANGE-REQUEST and OTHER-ADDRESS
	// work. The test is skipped when AltIP cannot be bound.
	RFC5780 bool
	// Config is the rest of the configuration. Start sets Listen to 127.0.0.1 on a free
	// port unless it is set, and AltIP and AltPort from RFC5780.
	Config stun.Config
}

// Start starts a server answering on loopback and stops it when the test ends. The
// server's UDPAddr, TCPAddr and Stats methods give its addresses and counters.
func Start(t testing.TB, opts Options) *stun.Server {
	t.Helper()
	cfg := opts.Config
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if opts.RFC5780 {
		probe, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(AltIP, 0)))
		if err != nil {
			t.Skipf("stuntest: cannot listen on %v (needs all of 127.0.0.0/8 on loopback, as on Linux): %v", AltIP, err)
		}
		probe.Close()
		cfg.AltIP = AltIP
		cfg.AltPort = 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := stun.Listen(ctx, cfg)
	if err != nil {
		t.Fatalf("stuntest: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("stuntest: Serve: %v", err)
		}
	})
	return s
}
