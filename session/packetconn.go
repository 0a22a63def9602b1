package session

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/connect"
	"peerlink/identity"
)

// Addr is a peerlink node as a net.Addr: QUIC runs over a connection to one peer
// whatever path carries it, so the peer's NodeID is its only stable address.
type Addr struct {
	ID identity.NodeID
	s  string // ID.String(): QUIC compares addresses by it for every packet
}

// NewAddr returns id's Addr.
func NewAddr(id identity.NodeID) *Addr { return &Addr{ID: id, s: id.String()} }

// Network is "peerlink".
func (*Addr) Network() string { return "peerlink" }

func (a *Addr) String() string {
	if a.s == "" {
		return a.ID.String()
	}
	return a.s
}

// PacketConn is a net.PacketConn over a connect.Conn's datagrams. Every packet goes to
// the one peer (the address given to WriteTo is ignored) and every packet read comes
// from it. The path under it may change (relayed, direct) without anything above
// seeing it. Writes never block: like UDP, a packet the path cannot take is lost.
type PacketConn struct {
	c      *connect.Conn
	local  *Addr
	remote *Addr

	base      context.Context // ends at Close
	closeBase context.CancelFunc

	mu      sync.Mutex
	readCtx context.Context // the current read deadline's context
	cancel  context.CancelCauseFunc
	stopDL  context.CancelFunc
	writeDL time.Time
	closed  atomic.Bool
	dropped atomic.Uint64
}

// errDeadlineMoved cancels the reads waiting under a deadline that was replaced.
var errDeadlineMoved = errors.New("session: read deadline moved")

// NewPacketConn wraps c; local is this node's ID. Closing the PacketConn does not close
// c.
func NewPacketConn(c *connect.Conn, local identity.NodeID) *PacketConn {
	p := &PacketConn{c: c, local: NewAddr(local), remote: NewAddr(c.Peer())}
	p.base, p.closeBase = context.WithCancel(context.Background())
	p.setReadDeadline(time.Time{})
	return p
}

// timeoutError is what a read past its deadline returns: a net.Error whose Timeout and
// Temporary are true, as the net package's, and which is os.ErrDeadlineExceeded.
type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }
func (timeoutError) Unwrap() error   { return os.ErrDeadlineExceeded }

func (p *PacketConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "peerlink", Source: p.local, Addr: p.remote, Err: err}
}

// ReadFrom blocks until the peer's next datagram, the read deadline or Close.
func (p *PacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		if p.closed.Load() {
			return 0, nil, p.opError("read", net.ErrClosed)
		}
		p.mu.Lock()
		ctx := p.readCtx
		p.mu.Unlock()
		pkt, err := p.c.Recv(ctx)
		if err == nil {
			return copy(b, pkt), p.remote, nil
		}
		switch {
		case p.closed.Load():
			return 0, nil, p.opError("read", net.ErrClosed)
		case errors.Is(err, context.DeadlineExceeded):
			return 0, nil, p.opError("read", timeoutError{})
		case context.Cause(ctx) == errDeadlineMoved:
			continue
		}
		// The connection under us ended: nothing more will come.
		return 0, nil, p.opError("read", fmt.Errorf("%w: the connection ended: %w", net.ErrClosed, err))
	}
}

// WriteTo sends b to the peer; addr is ignored.
func (p *PacketConn) WriteTo(b []byte, _ net.Addr) (int, error) {
	if p.closed.Load() {
		return 0, p.opError("write", net.ErrClosed)
	}
	p.mu.Lock()
	dl := p.writeDL
	p.mu.Unlock()
	if !dl.IsZero() && !time.Now().Before(dl) {
		return 0, p.opError("write", timeoutError{})
	}
	if err := p.c.Send(b); err != nil {
		if errors.Is(err, connect.ErrClosed) {
			return 0, p.opError("write", fmt.Errorf("%w: the connection ended: %w", net.ErrClosed, err))
		}
		// A path between two states: lost, as a UDP packet would be. QUIC resends.
		p.dropped.Add(1)
	}
	return len(b), nil
}

// Dropped counts packets that WriteTo could not hand to a path.
func (p *PacketConn) Dropped() uint64 { return p.dropped.Load() }

// Close makes pending and later reads and writes fail. It does not close the
// connect.Conn. It is idempotent.
func (p *PacketConn) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	p.closeBase()
	p.mu.Lock()
	p.stopDL()
	p.mu.Unlock()
	return nil
}

// LocalAddr is this node's Addr.
func (p *PacketConn) LocalAddr() net.Addr { return p.local }

// RemoteAddr is the peer's Addr.
func (p *PacketConn) RemoteAddr() net.Addr { return p.remote }

// SetDeadline sets both deadlines.
func (p *PacketConn) SetDeadline(t time.Time) error {
	p.SetReadDeadline(t)
	return p.SetWriteDeadline(t)
}

// SetReadDeadline sets when pending and later reads time out; zero means never.
func (p *PacketConn) SetReadDeadline(t time.Time) error {
	p.setReadDeadline(t)
	return nil
}

func (p *PacketConn) setReadDeadline(t time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cancel != nil {
		p.cancel(errDeadlineMoved)
		p.stopDL()
	}
	ctx, cancel := context.WithCancelCause(p.base)
	p.cancel, p.stopDL = cancel, func() {}
	if !t.IsZero() {
		var stop context.CancelFunc
		ctx, stop = context.WithDeadline(ctx, t)
		p.stopDL = stop
	}
	p.readCtx = ctx
}

// SetWriteDeadline sets when later writes fail; writes never block, so it only
// matters once passed.
func (p *PacketConn) SetWriteDeadline(t time.Time) error {
	p.mu.Lock()
	p.writeDL = t
	p.mu.Unlock()
	return nil
}

// SetReadBuffer and SetWriteBuffer are accepted and ignored: the node's socket is
// sized by connect. (QUIC asks for bigger buffers and would warn otherwise.)
func (p *PacketConn) SetReadBuffer(int) error { return nil }

// SetWriteBuffer: see SetReadBuffer.
func (p *PacketConn) SetWriteBuffer(int) error { return nil }

var _ net.PacketConn = (*PacketConn)(nil)
