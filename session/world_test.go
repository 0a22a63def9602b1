package session

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/connect/connecttest"
	"peerlink/identity"
	"peerlink/nettype"
)

// newWorld builds connect's emulated internet (a two-IP STUN server, a TURN relay,
// NATs from natlab, and a real rendezvous server on loopback) for the test.
func newWorld(t testing.TB, seed uint64) *world {
	t.Helper()
	return &world{connecttest.NewWorld(t, connecttest.Config{Seed: seed})}
}

type world struct{ *connecttest.World }

// node is a test node: connect's Node, its identity, and a switch that cuts every path
// but the ones to the STUN and TURN servers, as a NAT that lost the peer's mapping.
type node struct {
	*connect.Node
	id  *identity.Identity
	cut *cutNet
}

// node starts a node behind a new NAT of type typ ("ei-pd-pp", ...).
func (w *world) node(name, typ string, pc connect.PathCheck) *node {
	var cn *cutNet
	n := w.AddNode(connecttest.NodeConfig{Name: name, NAT: typ, PathCheck: pc, WaitRelay: true,
		Wrap: func(l nettype.PacketListener) nettype.PacketListener {
			cn = &cutNet{h: l, keep: w.ServerIPs()}
			return cn
		}})
	return &node{Node: n.Node, id: n.Identity, cut: cn}
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

// cutNet is a node's network whose sockets can be cut off from everything but keep.
type cutNet struct {
	h    nettype.PacketListener
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
