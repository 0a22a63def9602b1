package natlab_test

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/natlab"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Addresses used across the tests.
var (
	pubX  = netip.MustParseAddr("203.0.113.10")
	pubX2 = netip.MustParseAddr("203.0.113.11")
	pubY  = netip.MustParseAddr("203.0.113.20")
	natA  = netip.MustParseAddr("198.51.100.1")
	natB  = netip.MustParseAddr("198.51.100.2")
	lanA  = netip.MustParseAddr("192.168.1.2")
	lanA2 = netip.MustParseAddr("192.168.1.3")
)

func at(ip netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(ip, port) }

func listen(t testing.TB, h *natlab.Host, address string) net.PacketConn {
	t.Helper()
	c, err := h.ListenPacket(context.Background(), "udp4", address)
	if err != nil {
		t.Fatalf("listen on %s %s: %v", h.Name(), address, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func localPort(c net.PacketConn) uint16 { return c.LocalAddr().(*net.UDPAddr).AddrPort().Port() }

func send(t testing.TB, c net.PacketConn, to netip.AddrPort, msg string) {
	t.Helper()
	if _, err := c.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(to)); err != nil {
		t.Fatalf("write to %v: %v", to, err)
	}
}

func fromAddr(t testing.TB, a net.Addr) netip.AddrPort {
	t.Helper()
	ua, ok := a.(*net.UDPAddr)
	if !ok {
		t.Fatalf("source address is %T, want *net.UDPAddr", a)
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// recv reads one packet, failing the test when none comes within five seconds of real
// time. On a real-clock network a zero-latency packet is already queued when WriteTo
// returns, so this does not wait; the deadline only stops a broken test from hanging.
func recv(t testing.TB, c net.PacketConn) (string, netip.AddrPort) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, 2048)
	n, from, err := c.ReadFrom(buf)
	if err != nil {
		t.Fatalf("%v: read: %v", c.LocalAddr(), err)
	}
	return string(buf[:n]), fromAddr(t, from)
}

// expectDropped runs f, which sends, and fails the test if the network delivered
// anything meanwhile. Zero-latency delivery is synchronous, so this is exact without
// waiting.
func expectDropped(t testing.TB, n *natlab.Network, why string, f func()) {
	t.Helper()
	if got := delivered(n, f); got != 0 {
		t.Errorf("%s: %d packets delivered, want none", why, got)
	}
}

// readQueued reads a packet already known (from Stats) to be queued, without deadlines,
// so it works on fake-clock networks.
func readQueued(t testing.TB, c net.PacketConn) (string, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 2048)
	n, from, err := c.ReadFrom(buf)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(buf[:n]), fromAddr(t, from)
}

// delivered runs f and returns how many packets the network queued on sockets meanwhile.
func delivered(n *natlab.Network, f func()) uint64 {
	before := n.Stats().Delivered
	f()
	return n.Stats().Delivered - before
}
