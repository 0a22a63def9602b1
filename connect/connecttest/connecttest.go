// Package connecttest runs peerlink nodes in an emulated internet, for tests and
// examples: STUN, a TURN relay, a rendezvous server and nodes behind any NAT, in one
// process, with no root and no network.
//
// Start and StartNode return errors and leave closing to the caller; NewWorld and
// AddNode are the same for tests, failing the test on error and closing at its end.
package connecttest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/internal/emuworld"
	"peerlink/natlab"
	"peerlink/nettype"
	"peerlink/punch"
	"peerlink/signal"
)

// The servers' addresses on the emulated internet.
var (
	// STUNIP1 and STUNIP2 are the STUN server's two addresses.
	STUNIP1 = emuworld.STUNIP1
	STUNIP2 = emuworld.STUNIP2
	// TURNIP is the TURN relay's address.
	TURNIP = emuworld.TURNIP
)

// ErrBadNAT is returned for a NodeConfig.NAT that is neither a kind nor a type.
var ErrBadNAT = emuworld.ErrBadNAT

// Config shapes a world. The zero value is seed 0 and a rendezvous server of the
// world's own with signal's defaults.
type Config struct {
	// Seed drives every random choice of the emulator (ports, loss).
	Seed uint64
	// SignalURL is a running rendezvous server (ws://...) to use; empty starts one on
	// loopback for the world. Tests that build many worlds share one.
	SignalURL string
	// Signal configures the world's own rendezvous server; unused with SignalURL.
	Signal signal.Config
	// Logger receives the servers' logs; nil means quiet.
	Logger *slog.Logger
}

// World is a running emulated internet.
type World struct {
	// Net is the emulated network; tests may add their own hosts and NATs to it.
	Net *natlab.Network
	// STUN is what nodes take as connect.Config.STUN.
	STUN []string
	// Relay is the TURN relay nodes use unless NodeConfig.NoRelay; a test may point it
	// elsewhere (at a relay that is down, say) before adding nodes.
	Relay *connect.RelayConfig
	// SignalURL is the rendezvous server's URL.
	SignalURL string

	core  *emuworld.World
	t     testing.TB // set by NewWorld, for AddNode
	nodes atomic.Int32
}

// Start builds a world; Close stops it.
func Start(cfg Config) (*World, error) {
	core, err := emuworld.Start(emuworld.Config{Seed: cfg.Seed, SignalURL: cfg.SignalURL, Signal: cfg.Signal, Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	return &World{
		Net: core.Net, STUN: core.STUN, SignalURL: core.SignalURL, core: core,
		Relay: &connect.RelayConfig{Server: core.TURN, Username: emuworld.TURNUser, Password: emuworld.TURNPassword},
	}, nil
}

// NewWorld builds a world that closes when the test ends, and fails the test if it
// cannot.
func NewWorld(t testing.TB, cfg Config) *World {
	t.Helper()
	w, err := Start(cfg)
	if err != nil {
		t.Fatalf("connecttest: %v", err)
	}
	w.t = t
	t.Cleanup(w.Close)
	return w
}

// Close stops the world's servers and network and waits for them; close its nodes
// first. It is idempotent, and drops the world's references, so that a test holding
// the World until it ends does not hold the emulated internet.
func (w *World) Close() {
	if w.core != nil {
		w.core.Close()
	}
	*w = World{}
}

// ServerIPs are the STUN and TURN servers' addresses: what a node needs to reach even
// when a test cuts its other paths.
func (w *World) ServerIPs() []netip.Addr { return w.core.ServerIPs() }

// Site is a host on the emulated internet, and the NAT in front of it.
type Site = emuworld.Site

// AddSite places a host named name behind the NAT nat names (see NodeConfig.NAT), with
// link as its uplink, for tests that run something other than a node there.
func (w *World) AddSite(name, nat string, link natlab.Link) (*Site, error) {
	return w.core.AddSite(name, emuworld.SiteConfig{NAT: nat, Link: link})
}

// NodeConfig shapes one node. The zero value is a node behind a port-restricted NAT
// that is told its NAT's behaviour rather than profiling it, and relays through the
// world's relay.
type NodeConfig struct {
	// Name names the node's host (unique in the world); empty means node1, node2...
	Name string
	// NAT is what the node sits behind: "open" for a public host; a netlab kind
	// ("none", "full-cone", "restricted-cone", "port-restricted", "symmetric",
	// "symmetric-seq", "cgnat"); or a NATCracker type as nat.ParseType reads it
	// ("ei-pd-pp"). Empty means "port-restricted".
	NAT string
	// Link is the NAT's uplink or the public host's link; the zero value delivers at
	// once and loses nothing.
	Link natlab.Link
	// Detect profiles the NAT with STUN, as a node out in the world would, instead of
	// telling the node how its NAT was built (which is faster).
	Detect bool
	// NoRelay starts the node without a relay.
	NoRelay bool
	// WaitRelay waits for the relay allocation before returning, so that nodes start
	// from the same footing.
	WaitRelay bool
	// Wrap, when set, wraps the node's network (to cut paths in tests).
	Wrap func(nettype.PacketListener) nettype.PacketListener
	// PathCheck and LAN are passed to connect.Config.
	PathCheck connect.PathCheck
	LAN       *connect.LANConfig
	// Identity is the node's key; nil generates one.
	Identity *identity.Identity
	// Logger receives the node's and its rendezvous client's logs; nil means quiet.
	Logger *slog.Logger
}

// Node is a started node with what a test needs to know about it.
type Node struct {
	*connect.Node
	Identity *identity.Identity
	// Signal is the node's rendezvous client; Close closes it after the node.
	Signal *signal.Client
	Site   *Site
	once   sync.Once
}

// Close closes the node and then its rendezvous client. It is idempotent.
func (n *Node) Close() error {
	var err error
	n.once.Do(func() {
		err = errors.Join(n.Node.Close(), n.Signal.Close())
	})
	return err
}

// StartNode places a host behind a new NAT and starts a node there, connected to the
// world's rendezvous server. The caller closes it before the world.
func (w *World) StartNode(ctx context.Context, cfg NodeConfig) (*Node, error) {
	name := cfg.Name
	if name == "" {
		name = fmt.Sprintf("node%d", w.nodes.Add(1))
	}
	site, err := w.core.AddSite(name, emuworld.SiteConfig{NAT: cfg.NAT, Link: cfg.Link})
	if err != nil {
		return nil, err
	}
	id := cfg.Identity
	if id == nil {
		if id, err = identity.Generate(); err != nil {
			return nil, err
		}
	}
	sc, err := signal.Dial(ctx, w.SignalURL, id, &signal.Options{Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("%s: rendezvous: %w", name, err)
	}
	h := site.Host
	var netw nettype.PacketListener = h
	if cfg.Wrap != nil {
		netw = cfg.Wrap(h)
	}
	cc := connect.Config{
		Identity: id, Signal: sc, STUN: w.STUN, Net: netw, PathCheck: cfg.PathCheck, LAN: cfg.LAN, Logger: cfg.Logger,
		LocalIPs: func() ([]netip.Addr, error) { return h.Addrs(), nil },
		// The emulator delivers at once: probes can be paced far faster than on a real
		// network without loss.
		Punch: punch.Config{Pace: time.Millisecond, ProbeInterval: time.Millisecond, CheckInterval: 20 * time.Millisecond},
	}
	if !cfg.Detect {
		p := site.Profile
		cc.Profile = &p
	}
	if !cfg.NoRelay {
		cc.Relay = w.Relay
	}
	n, err := connect.Start(ctx, cc)
	if err != nil {
		sc.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	node := &Node{Node: n, Identity: id, Signal: sc, Site: site}
	if cfg.WaitRelay {
		if err := n.WaitRelay(ctx); err != nil {
			node.Close()
			return nil, fmt.Errorf("%s: relay: %w", name, err)
		}
	}
	return node, nil
}

// AddNode starts a node as StartNode does, within 10 s, in a world from NewWorld; the
// node closes when the test ends, and the test fails if it cannot start.
func (w *World) AddNode(cfg NodeConfig) *Node {
	t := w.t
	if t == nil {
		panic("connecttest: AddNode needs a world from NewWorld; use StartNode")
	}
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := w.StartNode(ctx, cfg)
	if err != nil {
		t.Fatalf("connecttest: starting a node: %v", err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// Pair connects a to b and returns both ends: a's, and the next connection b accepts,
// which is a's unless others are connecting to b too. Datagrams may still be lost
// while the first path settles.
func Pair(ctx context.Context, a, b *Node, opts connect.Options) (ca, cb *connect.Conn, err error) {
	type accepted struct {
		c   *connect.Conn
		err error
	}
	ch := make(chan accepted, 1)
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		c, err := b.Accept(actx)
		ch <- accepted{c, err}
	}()
	ca, err = a.Connect(ctx, b.NodeID(), opts)
	if err != nil {
		cancel()
		if r := <-ch; r.c != nil {
			r.c.Close()
		}
		return nil, nil, err
	}
	r := <-ch
	if r.err != nil {
		ca.Close()
		return nil, nil, fmt.Errorf("connecttest: %s never accepted: %w", b.NodeID().Short(), r.err)
	}
	return ca, r.c, nil
}
