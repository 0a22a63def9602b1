// Package relaytest starts a peerlink TURN relay on loopback for tests.
package relaytest

import (
	"net/netip"
	"testing"

	"peerlink/relay"
)

// Credentials of the user every test relay has.
const (
	User     = "peerlink"
	Password = "relaytest"
)

// Relay is a running test relay.
type Relay struct {
	*relay.Server
	// UDP and TCP are where clients reach it.
	UDP, TCP netip.AddrPort
}

// Start starts a relay on 127.0.0.1, over UDP and TCP, with the user User and loopback
// peers allowed (tests relay between loopback sockets). Fields set in cfg are kept;
// the relay closes when the test ends.
func Start(tb testing.TB, cfg relay.Config) *Relay {
	tb.Helper()
	if cfg.ListenUDP == "" {
		cfg.ListenUDP = "127.0.0.1:0"
	}
	if cfg.ListenTCP == "" {
		cfg.ListenTCP = "127.0.0.1:0"
	}
	if cfg.Users == nil && cfg.Secret == "" {
		cfg.Users = map[string]string{User: Password}
	}
	cfg.AllowLoopbackPeers = true
	if cfg.Loops == 0 {
		cfg.Loops = 1
	}
	s, err := relay.New(cfg)
	if err != nil {
		tb.Fatalf("relaytest: %v", err)
	}
	if err := s.Start(); err != nil {
		tb.Fatalf("relaytest: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	addrs := s.Addrs()
	r := &Relay{Server: s}
	if a := addrs[relay.UDP]; len(a) > 0 {
		r.UDP = a[0]
	}
	if a := addrs[relay.TCP]; len(a) > 0 {
		r.TCP = a[0]
	}
	return r
}
