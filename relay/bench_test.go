package relay_test

import (
	"encoding/binary"
	"net"
	"runtime"
	"testing"
	"time"

	"peerlink/relay"
	"peerlink/relay/relaytest"
)

// detach stops the client's reader so a test can use its socket directly, without the
// reader's allocations.
func (c *turnClient) detach() net.Conn {
	c.conn.SetReadDeadline(time.Unix(1, 0))
	<-c.done
	c.conn.SetReadDeadline(time.Time{})
	return c.conn
}

// pingPong relays n round trips client -> relay -> peer -> relay -> client over a
// channel, with no allocation on the test's side.
type pingPong struct {
	client net.Conn
	peer   *net.UDPConn
	out    []byte
	in     []byte
}

func newPingPong(tb testing.TB, size int) *pingPong {
	tb.Helper()
	r := relaytest.Start(tb, relay.Config{})
	c := dialTURN(tb, "udp", r.UDP, relaytest.User, relaytest.Password)
	relayed := c.allocate()
	p := newPeer(tb, "udp4", "127.0.0.1:0")
	if code := c.bind(0x4000, p.addr); code != 0 {
		tb.Fatal(code)
	}
	// The peer answers the relayed address once, so it learns where to reply.
	pp := &pingPong{client: c.detach(), peer: p.conn, out: make([]byte, 4+size), in: make([]byte, 2048)}
	binary.BigEndian.PutUint16(pp.out, 0x4000)
	binary.BigEndian.PutUint16(pp.out[2:], uint16(size))
	pp.peer.SetReadDeadline(time.Now().Add(time.Minute))
	pp.client.SetReadDeadline(time.Now().Add(time.Minute))
	_ = relayed
	return pp
}

func (pp *pingPong) round(tb testing.TB) {
	if _, err := pp.client.Write(pp.out); err != nil {
		tb.Fatal(err)
	}
	n, from, err := pp.peer.ReadFromUDPAddrPort(pp.in)
	if err != nil || n != len(pp.out)-4 {
		tb.Fatalf("peer read %d: %v", n, err)
	}
	if _, err := pp.peer.WriteToUDPAddrPort(pp.in[:n], from); err != nil {
		tb.Fatal(err)
	}
	if n, err := pp.client.Read(pp.in); err != nil || n != len(pp.out) {
		tb.Fatalf("client read %d: %v", n, err)
	}
}

// TestDataPathDoesNotAllocate relays thousands of packets through the relay, in this
// process, and checks the whole process barely allocated meanwhile.
func TestDataPathDoesNotAllocate(t *testing.T) {
	pp := newPingPong(t, 1200)
	for range 100 { // warm up: channel route, buffers, runtime
		pp.round(t)
	}
	const rounds = 2000
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range rounds {
		pp.round(t)
	}
	runtime.ReadMemStats(&after)
	// Each round is two relayed packets. A few allocations come from the relay's
	// once-a-second sweep and the runtime; none may come per packet.
	if mallocs := after.Mallocs - before.Mallocs; mallocs > rounds/20 {
		t.Fatalf("%d allocations for %d relayed packets", mallocs, 2*rounds)
	}
}

// BenchmarkRelayRoundTrip is one ChannelData round trip through the relay: client to
// peer and back, 1200-byte payloads, on loopback.
func BenchmarkRelayRoundTrip(b *testing.B) {
	pp := newPingPong(b, 1200)
	b.ReportAllocs()
	b.SetBytes(2 * 1200)
	for b.Loop() {
		pp.round(b)
	}
}
