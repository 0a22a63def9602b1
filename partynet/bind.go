package partynet

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"

	"peerlink/identity"
)

// ErrNoConn is what the bind returns when WireGuard sends to a member that has no
// peerlink connection (yet); WireGuard retries its handshake, by which time the
// device has usually dialled one.
var ErrNoConn = errors.New("partynet: no connection to member")

// Datagrams on a member's connection are WireGuard messages (their first byte is the
// message type, 1 to 4, followed by three zero bytes) or the device's own latency
// probes, which start with a byte WireGuard never uses.
const (
	probePing = 0xF0
	probePong = 0xF1
)

// endpoint is a member, as WireGuard sees it: its NodeID instead of an IP address and
// port, so that WireGuard's packets follow the member's peerlink connection wherever
// that connection's path goes.
type endpoint struct {
	id identity.NodeID
}

func (e *endpoint) ClearSrc()           {}
func (e *endpoint) SrcToString() string { return "" }
func (e *endpoint) DstToString() string { return e.id.String() }
func (e *endpoint) DstToBytes() []byte  { return e.id[:] }

// DstIP stands in a per-member address for WireGuard's handshake rate limiter, which
// keys on it.
func (e *endpoint) DstIP() netip.Addr {
	var a [16]byte
	copy(a[:], e.id[:16])
	a[0] = 0xfd
	return netip.AddrFrom16(a)
}
func (e *endpoint) SrcIP() netip.Addr { return netip.Addr{} }

// datagramSender is the part of a peerlink connection (connect.Conn) the bind writes
// to: WireGuard's runs of packets go as batches, the device's probes one by one.
type datagramSender interface {
	Send(b []byte) error
	SendBatch(bufs [][]byte) error
}

type datagram struct {
	b    []byte
	from *endpoint
}

// bind is a WireGuard conn.Bind whose "socket" is the set of members' peerlink
// connections. Connections are attached and detached by the device as they come and
// go; WireGuard's own Open/Close cycles (on up/down) only gate delivery.
type bind struct {
	mu    sync.Mutex
	eps   map[identity.NodeID]*endpoint
	conns map[identity.NodeID]datagramSender
	gen   chan struct{} // closed by Close; replaced by Open

	in      chan datagram
	dropped atomic.Uint64
	// probe handles the device's latency probes; nil drops them.
	probe func(from identity.NodeID, b []byte)
}

// inQueue is how many received datagrams wait for WireGuard before more are
// dropped: a TCP window's worth at full speed.
const inQueue = 2048

func newBind() *bind {
	closed := make(chan struct{})
	close(closed)
	return &bind{
		eps:   make(map[identity.NodeID]*endpoint),
		conns: make(map[identity.NodeID]datagramSender),
		gen:   closed,
		in:    make(chan datagram, inQueue),
	}
}

func (b *bind) endpointFor(id identity.NodeID) *endpoint {
	b.mu.Lock()
	defer b.mu.Unlock()
	ep := b.eps[id]
	if ep == nil {
		ep = &endpoint{id: id}
		b.eps[id] = ep
	}
	return ep
}

// attach makes s the way to id; a later attach replaces it.
func (b *bind) attach(id identity.NodeID, s datagramSender) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.conns[id] = s
}

// detach forgets s as the way to id, unless it was replaced already.
func (b *bind) detach(id identity.NodeID, s datagramSender) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conns[id] == s {
		delete(b.conns, id)
	}
}

func (b *bind) sender(id identity.NodeID) datagramSender {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conns[id]
}

// deliver hands a datagram from a member's connection to WireGuard (or to the
// prober); it never blocks, so one slow consumer cannot stall a connection's reader.
func (b *bind) deliver(from identity.NodeID, p []byte) {
	if len(p) == 0 {
		return
	}
	if p[0] == probePing || p[0] == probePong {
		if b.probe != nil {
			b.probe(from, p)
		}
		return
	}
	select {
	case b.in <- datagram{p, b.endpointFor(from)}:
	default:
		b.dropped.Add(1)
	}
}

// Open implements conn.Bind. The port is meaningless here and reported as zero.
func (b *bind) Open(uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-b.gen:
	default:
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	gen := make(chan struct{})
	b.gen = gen
	recv := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		var d datagram
		select {
		case d = <-b.in:
		case <-gen:
			return 0, net.ErrClosed
		}
		n := 0
		for {
			sizes[n] = copy(packets[n], d.b)
			eps[n] = d.from
			n++
			if n == len(packets) {
				return n, nil
			}
			select {
			case d = <-b.in:
			default:
				return n, nil
			}
		}
	}
	return []conn.ReceiveFunc{recv}, 0, nil
}

// Close implements conn.Bind: the receive functions return net.ErrClosed. The
// members' connections stay; the device owns them.
func (b *bind) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-b.gen:
	default:
		close(b.gen)
	}
	return nil
}

func (b *bind) SetMark(uint32) error { return nil }

// Send implements conn.Bind over the member's connection, whatever its current path.
func (b *bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	e, ok := ep.(*endpoint)
	if !ok {
		return ErrNoConn
	}
	s := b.sender(e.id)
	if s == nil {
		return ErrNoConn
	}
	return s.SendBatch(bufs)
}

// ParseEndpoint implements conn.Bind: an endpoint is a member's NodeID.
func (b *bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	id, err := identity.ParseNodeID(s)
	if err != nil {
		return nil, err
	}
	return b.endpointFor(id), nil
}

// BatchSize is how many datagrams one receive call may return.
func (b *bind) BatchSize() int { return 64 }

var _ conn.Bind = (*bind)(nil)
