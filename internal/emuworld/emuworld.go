// Package emuworld builds the emulated internet peerlink's tests and demo run in: an RFC
// 5780 STUN server on two addresses and a TURN relay on a natlab network, a rendezvous
// server on loopback, and hosts behind whatever NAT a test names.
//
// It knows nothing of connect (whose own tests use it) nor of testing (the demo, a part
// of the peerlink command, uses it too); connect/connecttest builds nodes on top of it.
package emuworld

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/pion/turn/v4"

	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/netlab"
	"peerlink/signal"
	"peerlink/stun"
)

// The servers' addresses on the emulated internet.
var (
	// STUNIP1 and STUNIP2 are the STUN server's two addresses (RFC 5780 needs both).
	STUNIP1 = netip.MustParseAddr("203.0.113.10")
	STUNIP2 = netip.MustParseAddr("203.0.113.11")
	// TURNIP is the TURN relay's address; relayed addresses are allocated on it too.
	TURNIP = netip.MustParseAddr("203.0.113.30")
)

// The TURN relay's long-term credentials.
const (
	TURNUser     = "peer"
	TURNPassword = "secret"
	TURNRealm    = "peerlink"
)

// Errors.
var (
	// ErrBadNAT: a SiteConfig.NAT that is neither a kind nor a type.
	ErrBadNAT = errors.New("emuworld: unknown NAT")
	// ErrUnsupported: a NAT the emulator cannot host usefully (UDP-blocked peers need
	// TURN over TCP, which the emulated relay has not).
	ErrUnsupported = errors.New("emuworld: not supported in the emulator")
	// ErrFull: the world has no addresses left for another site.
	ErrFull = errors.New("emuworld: no addresses left")
	// ErrClosed: the world is closed.
	ErrClosed = errors.New("emuworld: closed")
)

// Config shapes a world. The zero value is seed 0, a rendezvous server of the world's
// own with signal's defaults, and no logs.
type Config struct {
	// Seed drives every random choice of the emulator (ports, loss).
	Seed uint64
	// SignalURL is a running rendezvous server (ws://...) the world's nodes are to use;
	// empty starts one on loopback for the world. Tests that build many worlds share one.
	SignalURL string
	// Signal configures the world's own rendezvous server; unused with SignalURL. A nil
	// Signal.Logger takes Logger.
	Signal signal.Config
	// Logger receives the servers' logs; nil means quiet.
	Logger *slog.Logger
}

// World is a running emulated internet. Its fields are read-only.
type World struct {
	// Net is the emulated network; tests add their own hosts and NATs to it as well.
	Net *natlab.Network
	// STUN is the STUN server's primary address, as nodes and detectors take it.
	STUN []string
	// TURN is the relay's host:port (credentials TURNUser and TURNPassword).
	TURN string
	// SignalURL is the rendezvous server's URL: Config.SignalURL or the world's own.
	SignalURL string

	closers []func() // last first

	mu     sync.Mutex
	sites  int
	closed bool
}

// Start builds a world. Close stops it.
func Start(cfg Config) (_ *World, err error) {
	w := &World{Net: natlab.New(natlab.Config{Seed: cfg.Seed})}
	n := w.Net
	w.closers = append(w.closers, func() { n.Close() })
	defer func() {
		if err != nil {
			w.Close()
		}
	}()

	sh := n.AddPublicHost("stun", STUNIP1, STUNIP2)
	addr := netip.AddrPortFrom(STUNIP1, 3478).String()
	s, err := stun.Listen(context.Background(), stun.Config{
		Listen: addr, AltIP: STUNIP2, AltPort: 3479,
		Net: sh, RateLimit: stun.RateLimit{Disabled: true}, Logger: cfg.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("emuworld: STUN server: %w", err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		s.Serve(context.Background())
	}()
	w.closers = append(w.closers, func() { s.Close(); <-served })
	w.STUN = []string{addr}

	// peerlink's own relay needs kernel sockets; on the emulator a TURN server that
	// takes any net.PacketConn stands in for it.
	th := n.AddPublicHost("turn", TURNIP)
	w.TURN = netip.AddrPortFrom(TURNIP, 3478).String()
	pc, err := th.ListenPacket(context.Background(), "udp4", w.TURN)
	if err != nil {
		return nil, fmt.Errorf("emuworld: TURN server: %w", err)
	}
	key := turn.GenerateAuthKey(TURNUser, TURNRealm, TURNPassword)
	ts, err := turn.NewServer(turn.ServerConfig{
		Realm:             TURNRealm,
		AuthHandler:       func(u, _ string, _ net.Addr) ([]byte, bool) { return key, u == TURNUser },
		PacketConnConfigs: []turn.PacketConnConfig{{PacketConn: pc, RelayAddressGenerator: relayAddrs{th}}},
	})
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("emuworld: TURN server: %w", err)
	}
	w.closers = append(w.closers, func() { ts.Close() })

	w.SignalURL = cfg.SignalURL
	if w.SignalURL == "" {
		// Real and on loopback: signaling is not what the NATs are in the way of.
		sc := cfg.Signal
		if sc.Logger == nil {
			sc.Logger = cfg.Logger
		}
		srv, err := signal.NewServer(sc)
		if err != nil {
			return nil, fmt.Errorf("emuworld: rendezvous server: %w", err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			srv.Close()
			return nil, fmt.Errorf("emuworld: rendezvous server needs a loopback TCP port: %w", err)
		}
		ctx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.Serve(ctx, ln)
		}()
		w.closers = append(w.closers, func() { stop(); <-done; srv.Close() })
		w.SignalURL = "ws://" + ln.Addr().String() + "/"
	}
	return w, nil
}

// Close stops the servers and the network and waits for them. It is idempotent. It
// drops the world's references too, so that a test that keeps the World reachable
// until it ends (in a cleanup, say) does not keep the whole emulated internet.
func (w *World) Close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	closers := w.closers
	w.closers = nil
	w.mu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
	w.Net = nil
}

// ServerIPs are the addresses of the STUN and TURN servers: what a node needs to reach
// even when a test cuts its other paths.
func (w *World) ServerIPs() []netip.Addr { return []netip.Addr{STUNIP1, STUNIP2, TURNIP} }

// relayAddrs allocates TURN relayed addresses on the emulated relay host.
type relayAddrs struct{ h *natlab.Host }

func (relayAddrs) Validate() error { return nil }

func (g relayAddrs) AllocatePacketConn(_ string, port int) (net.PacketConn, net.Addr, error) {
	c, err := g.h.ListenPacket(context.Background(), "udp4", netip.AddrPortFrom(TURNIP, uint16(port)).String())
	if err != nil {
		return nil, nil, err
	}
	return c, c.LocalAddr(), nil
}

func (relayAddrs) AllocateConn(string, int) (net.Conn, net.Addr, error) {
	return nil, nil, errors.New("emuworld: no TCP relaying in the emulator")
}

// SiteConfig is one host and the NAT in front of it.
type SiteConfig struct {
	// NAT is what the host sits behind: "open" for a public host; a netlab kind
	// ("none", "full-cone", "restricted-cone", "port-restricted", "symmetric",
	// "symmetric-seq", "cgnat": a port-restricted home NAT behind a carrier's NAT); or
	// a NATCracker type as nat.ParseType reads it ("ei-pd-pp"). Empty means
	// "port-restricted", the common home router.
	NAT string
	// Link is the NAT's uplink (the carrier's, behind a CGNAT) or the public host's
	// link; the zero value delivers at once and loses nothing.
	Link natlab.Link
}

// Site is a host on the emulated internet.
type Site struct {
	Name string
	Host *natlab.Host
	// NAT is the NAT the host is directly behind (the home NAT behind a CGNAT); nil for
	// a public host.
	NAT *natlab.NAT
	// Profile is the behaviour the site is built to have: what a node there may be told
	// instead of profiling: the kind's netlab claim, or for a type its policies with a
	// port delta of 1.
	Profile nat.Profile
}

// AddSite places a host named name (unique in the world; its NATs are name-nat, or
// name-home and name-carrier) behind the NAT cfg names. The n-th site's NAT is at
// 198.51.100.n with its host at 192.168.n.2; a public host is at 203.0.113.(100+n).
func (w *World) AddSite(name string, cfg SiteConfig) (*Site, error) {
	spec := cfg.NAT
	if spec == "" {
		spec = netlab.KindPortRestricted.String()
	}
	var (
		kind  netlab.Kind
		typ   nat.Type
		delta int
		prof  nat.Profile
	)
	if spec == "open" {
		kind = netlab.KindNone
	} else if k, err := netlab.ParseKind(spec); err == nil {
		kind = k
	} else if t, err := nat.ParseType(spec); err == nil {
		typ = t
	} else {
		return nil, fmt.Errorf("%w %q: want open, a netlab kind or a type such as ei-pd-pp", ErrBadNAT, spec)
	}
	switch kind {
	case netlab.KindUnknown:
		prof = nat.Profile{Mapping: typ.Mapping, Filtering: typ.Filtering, Allocation: typ.Allocation, PortDelta: 1}
	case netlab.KindUDPBlocked:
		return nil, fmt.Errorf("%w: %s", ErrUnsupported, kind)
	default:
		prof = kind.Claim()
		typ, delta = prof.Type(), prof.PortDelta
	}

	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil, ErrClosed
	}
	w.sites++
	i := w.sites
	w.mu.Unlock()
	if i > 254 {
		return nil, ErrFull
	}
	s := &Site{Name: name, Profile: prof}
	pub := netip.AddrFrom4([4]byte{198, 51, 100, byte(i)})
	lan := netip.AddrFrom4([4]byte{192, 168, byte(i), 2})
	switch kind {
	case netlab.KindNone:
		s.Host = w.Net.AddPublicHost(name, netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}))
		if cfg.Link != (natlab.Link{}) {
			s.Host.SetLink(cfg.Link)
		}
		return s, nil
	case netlab.KindCGNAT:
		// The carrier maps endpoint-independently, filters by address and picks random
		// ports; the home router behind it is port-restricted.
		carrier := w.Net.AddNAT(natlab.NATConfig{Name: name + "-carrier", PublicIP: pub, Uplink: cfg.Link,
			Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringHD, Allocation: nat.AllocationRD}})
		s.NAT = w.Net.AddNAT(natlab.NATConfig{Name: name + "-home", Parent: carrier, PublicIP: netip.MustParseAddr("100.64.0.2"),
			Type: netlab.KindPortRestricted.Claim().Type()})
	default:
		s.NAT = w.Net.AddNAT(natlab.NATConfig{Name: name + "-nat", Type: typ, Delta: delta, PublicIP: pub, Uplink: cfg.Link})
	}
	s.Host = s.NAT.AddHost(name, lan)
	return s, nil
}
