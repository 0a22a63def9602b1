package natlab

import (
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"peerlink/clock"
)

// Largest UDP payloads, as the kernel enforces them.
const (
	maxPayload4 = 65507
	maxPayload6 = 65527
)

// conn is a UDP socket on a Host. It implements net.PacketConn.
type conn struct {
	host    *Host
	network string
	local   netip.AddrPort // the bound address; its IP may be unspecified
	v4, v6  bool           // which families it sends and receives

	mu     sync.Mutex
	closed bool
	queue  []packet
	notify chan struct{} // holds a token while packets may be waiting
	done   chan struct{} // closed by shut

	rd, wd *deadline
}

var _ net.PacketConn = (*conn)(nil)

func newConn(h *Host, network string, local netip.AddrPort, v4, v6 bool) *conn {
	return &conn{
		host:    h,
		network: network,
		local:   local,
		v4:      v4,
		v6:      v6,
		notify:  make(chan struct{}, 1),
		done:    make(chan struct{}),
		rd:      newDeadline(h.net.clk),
		wd:      newDeadline(h.net.clk),
	}
}

func (c *conn) accepts(ip netip.Addr) bool {
	if ip.Is4() {
		return c.v4
	}
	return c.v6
}

// enqueue adds p to the receive queue unless the queue is full or the socket closed.
// It runs with net.mu held.
func (c *conn) enqueue(p packet, limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || len(c.queue) >= limit {
		return false
	}
	c.queue = append(c.queue, p)
	c.wake()
	return true
}

// wake leaves a token for one reader.
func (c *conn) wake() {
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

// shut closes the socket's side of things without touching the host's registry, and
// reports whether this call did it.
func (c *conn) shut() bool {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return false
	}
	c.closed = true
	c.queue = nil
	close(c.done)
	c.mu.Unlock()
	c.rd.set(time.Time{})
	c.wd.set(time.Time{})
	return true
}

func (c *conn) opError(op string, addr net.Addr, err error) error {
	e := &net.OpError{Op: op, Net: c.network, Source: c.LocalAddr(), Addr: addr, Err: err}
	if op == "read" {
		// The kernel's read errors name the socket as Addr, not Source.
		e.Source, e.Addr = nil, c.LocalAddr()
	}
	return e
}

// ReadFrom reads one packet; a packet longer than b is truncated, as UDP does.
func (c *conn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		// As with kernel sockets, a closed socket or a passed deadline wins over
		// queued packets.
		select {
		case <-c.done:
			return 0, nil, c.opError("read", nil, net.ErrClosed)
		default:
		}
		fired := c.rd.fired()
		select {
		case <-fired:
			return 0, nil, c.opError("read", nil, os.ErrDeadlineExceeded)
		default:
		}
		c.mu.Lock()
		if len(c.queue) > 0 {
			p := c.queue[0]
			c.queue[0] = packet{}
			c.queue = c.queue[1:]
			if len(c.queue) > 0 {
				c.wake() // another reader may be waiting for the rest
			}
			c.mu.Unlock()
			return copy(b, p.payload), net.UDPAddrFromAddrPort(p.src), nil
		}
		c.mu.Unlock()
		select {
		case <-c.notify:
		case <-c.done:
		case <-fired:
		}
	}
}

// WriteTo sends b to addr, which must be a *net.UDPAddr. It never blocks: delivery,
// loss and delay are the network's business.
func (c *conn) WriteTo(b []byte, addr net.Addr) (int, error) {
	select {
	case <-c.done:
		return 0, c.opError("write", addr, net.ErrClosed)
	default:
	}
	select {
	case <-c.wd.fired():
		return 0, c.opError("write", addr, os.ErrDeadlineExceeded)
	default:
	}
	ua, ok := addr.(*net.UDPAddr)
	if !ok || ua == nil {
		return 0, c.opError("write", addr, syscall.EINVAL)
	}
	dst := ua.AddrPort()
	dst = netip.AddrPortFrom(dst.Addr().Unmap().WithZone(""), dst.Port())
	if !dst.Addr().IsValid() || dst.Addr().IsUnspecified() || dst.Port() == 0 {
		return 0, c.opError("write", addr, syscall.EINVAL)
	}
	if !c.accepts(dst.Addr()) {
		return 0, c.opError("write", addr, syscall.EAFNOSUPPORT)
	}
	limit := maxPayload6
	if dst.Addr().Is4() {
		limit = maxPayload4
	}
	if len(b) > limit {
		return 0, c.opError("write", addr, os.NewSyscallError("sendto", syscall.EMSGSIZE))
	}
	n := c.host.net
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return 0, c.opError("write", addr, net.ErrClosed)
	}
	src, ok := c.host.source(c.local, dst.Addr())
	if !ok {
		return 0, c.opError("write", addr, os.NewSyscallError("sendto", syscall.ENETUNREACH))
	}
	n.send(c.host, packet{
		src:     netip.AddrPortFrom(src, c.local.Port()),
		dst:     dst,
		payload: slices.Clone(b),
	})
	return len(b), nil
}

// Close closes the socket; blocked reads return an error wrapping net.ErrClosed. A
// second Close returns such an error too, as kernel sockets do.
func (c *conn) Close() error {
	if !c.shut() {
		return c.opError("close", nil, net.ErrClosed)
	}
	n := c.host.net
	n.mu.Lock()
	defer n.mu.Unlock()
	if c.host.conns[c.local] == c {
		delete(c.host.conns, c.local)
	}
	return nil
}

// LocalAddr returns the bound address, with an unspecified IP when bound to none.
func (c *conn) LocalAddr() net.Addr { return net.UDPAddrFromAddrPort(c.local) }

// SetDeadline sets both deadlines. Deadlines are read on the network's clock.
func (c *conn) SetDeadline(t time.Time) error {
	c.rd.set(t)
	c.wd.set(t)
	return nil
}

// SetReadDeadline makes reads fail with os.ErrDeadlineExceeded from t on; zero clears it.
func (c *conn) SetReadDeadline(t time.Time) error {
	c.rd.set(t)
	return nil
}

// SetWriteDeadline makes writes fail with os.ErrDeadlineExceeded from t on; zero clears it.
func (c *conn) SetWriteDeadline(t time.Time) error {
	c.wd.set(t)
	return nil
}

// SetReadBuffer is accepted and ignored (the queue is bounded by Config.QueueLen), so
// code tuning kernel buffers runs unchanged.
func (c *conn) SetReadBuffer(int) error { return nil }

// SetWriteBuffer is accepted and ignored: writes never block.
func (c *conn) SetWriteBuffer(int) error { return nil }

// deadline is a settable point in time on a clock; fired returns a channel closed once
// it has passed.
type deadline struct {
	clk clock.Clock

	mu    sync.Mutex
	timer clock.Timer
	ch    chan struct{} // closed when the deadline passes; replaced when it is reset
}

func newDeadline(clk clock.Clock) *deadline {
	return &deadline{clk: clk, ch: make(chan struct{})}
}

func (d *deadline) fired() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ch
}

// set moves the deadline to t; zero means none.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		if !d.timer.Stop() {
			<-d.ch // the timer is firing; its close of d.ch is imminent
		}
		d.timer = nil
	}
	select {
	case <-d.ch:
		d.ch = make(chan struct{}) // an old deadline passed; the new one starts afresh
	default:
	}
	if t.IsZero() {
		return
	}
	wait := t.Sub(d.clk.Now())
	if wait <= 0 {
		close(d.ch)
		return
	}
	ch := d.ch
	d.timer = d.clk.AfterFunc(wait, func() { close(ch) })
}
