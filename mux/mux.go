// Package mux shares one UDP socket between STUN transactions, peer connectivity checks
// and the data path, so a node's NAT mapping — what peers punch toward — is the one its
// traffic uses.
package mux

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"peerlink/clock"
	"peerlink/stun"
)

// ErrClosed is returned by operations on a closed Mux.
var ErrClosed = errors.New("mux: closed")

// DataQueue is how many unread data packets a Mux holds before dropping new ones, as a
// kernel does on a full receive buffer.
const DataQueue = 1024

// Config configures a Mux. The zero value drops incoming STUN requests, logs nothing and
// uses the real clock.
type Config struct {
	// OnRequest receives STUN requests (connectivity checks from peers). It runs on the
	// read loop and must not block; msg is only valid during the call.
	OnRequest func(msg []byte, from netip.AddrPort)
	// Clock times retransmissions and data deadlines; nil means the real clock.
	Clock clock.Clock
	// Logger receives debug records; nil means quiet.
	Logger *slog.Logger
}

// Mux reads one socket and sorts what arrives: STUN responses go to the transaction
// waiting for them, STUN requests to Config.OnRequest, everything else to the data path.
type Mux struct {
	conn  net.PacketConn
	local netip.AddrPort
	cfg   Config
	clock clock.Clock

	mu      sync.Mutex
	pending map[stun.TransactionID]chan response
	closed  bool

	data *dataConn
	done chan struct{}
	off  *offload // nil unless conn is a real UDP socket with offloads
}

type response struct {
	msg  []byte
	from netip.AddrPort
}

// New starts reading conn. The Mux owns conn from now on: Close closes it.
func New(conn net.PacketConn, cfg Config) *Mux {
	m := &Mux{
		conn:    conn,
		local:   addrPortOf(conn.LocalAddr()),
		cfg:     cfg,
		clock:   clock.Or(cfg.Clock),
		pending: make(map[stun.TransactionID]chan response),
		done:    make(chan struct{}),
	}
	m.data = newDataConn(m)
	m.off = newOffload(conn)
	go m.readLoop()
	return m
}

// LocalAddr is the socket's local address.
func (m *Mux) LocalAddr() netip.AddrPort { return m.local }

// WriteTo sends one datagram.
func (m *Mux) WriteTo(b []byte, to netip.AddrPort) error {
	_, err := m.conn.WriteTo(b, net.UDPAddrFromAddrPort(to))
	return err
}

// WriteBatch sends datagrams to one address, in as few system calls as the socket
// allows (segmentation offload on Linux), else one by one.
func (m *Mux) WriteBatch(bufs [][]byte, to netip.AddrPort) error {
	if done, err := m.off.writeBatch(bufs, to); done {
		return err
	}
	for _, b := range bufs {
		if err := m.WriteTo(b, to); err != nil {
			return err
		}
	}
	return nil
}

// Data is the socket's non-STUN traffic as a net.PacketConn: what peers' data packets
// and, later, QUIC run on. Closing it closes the Mux.
func (m *Mux) Data() net.PacketConn { return m.data }

// Close closes the socket, fails pending transactions and waits for the reader. It is
// safe to call more than once.
func (m *Mux) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		<-m.done
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	err := m.conn.Close()
	<-m.done
	return err
}

// Transact sends the STUN request req, whose transaction ID is id, to dst and resends it
// every rto (growing by half each time) until a response with that ID arrives or ctx
// ends. It returns the raw response and where it came from.
func (m *Mux) Transact(ctx context.Context, dst netip.AddrPort, id stun.TransactionID, req []byte, rto time.Duration) ([]byte, netip.AddrPort, error) {
	ch := make(chan response, 1)
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, netip.AddrPort{}, ErrClosed
	}
	m.pending[id] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
	}()
	for {
		if err := m.WriteTo(req, dst); err != nil {
			return nil, netip.AddrPort{}, fmt.Errorf("mux: send to %v: %w", dst, err)
		}
		tick := make(chan struct{})
		t := m.clock.AfterFunc(rto, func() { close(tick) })
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, netip.AddrPort{}, fmt.Errorf("mux: transaction with %v: %w", dst, ctx.Err())
		case <-m.done:
			t.Stop()
			return nil, netip.AddrPort{}, ErrClosed
		case r := <-ch:
			t.Stop()
			return r.msg, r.from, nil
		case <-tick:
			rto += rto / 2
		}
	}
}

// Binding asks the STUN server srv for this socket's reflexive address.
func (m *Mux) Binding(ctx context.Context, srv netip.AddrPort, rto time.Duration) (netip.AddrPort, error) {
	id := stun.NewTransactionID()
	resp, _, err := m.Transact(ctx, srv, id, stun.AppendBindingRequest(nil, id, stun.RequestOptions{}), rto)
	if err != nil {
		return netip.AddrPort{}, err
	}
	r, err := stun.ParseBindingResponse(resp)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return r.Mapped, nil
}

func (m *Mux) readLoop() {
	defer close(m.done)
	defer m.data.closeQueue()
	buf := make([]byte, 64<<10)
	var oob []byte
	if m.off != nil && m.off.gro {
		oob = make([]byte, 64)
	}
	for {
		var n, seg int
		var from netip.AddrPort
		var err error
		if oob != nil {
			n, seg, from, err = m.off.read(buf, oob)
		} else {
			var a net.Addr
			n, a, err = m.conn.ReadFrom(buf)
			if err == nil {
				from = addrPortOf(a)
			}
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if m.cfg.Logger != nil {
				m.cfg.Logger.Debug("mux: read failed", "err", err)
			}
			return
		}
		if seg <= 0 || seg >= n {
			m.dispatch(buf[:n], from)
			continue
		}
		for off := 0; off < n; off += seg {
			m.dispatch(buf[off:min(off+seg, n)], from)
		}
	}
}

func (m *Mux) dispatch(b []byte, from netip.AddrPort) {
	if !stun.IsMessage(b) {
		m.data.enqueue(b, from)
		return
	}
	class := binary.BigEndian.Uint16(b) & 0x0110
	if class == 0 { // request
		if m.cfg.OnRequest != nil {
			m.cfg.OnRequest(b, from)
		}
		return
	}
	if class == 0x0010 { // indication: nothing here uses them
		return
	}
	var id stun.TransactionID
	copy(id[:], b[8:20])
	m.mu.Lock()
	ch, ok := m.pending[id]
	m.mu.Unlock()
	if !ok {
		return
	}
	select {
	case ch <- response{msg: append([]byte(nil), b...), from: from}:
	default: // answered already: a retransmission's response
	}
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if u, ok := a.(*net.UDPAddr); ok {
		ap := u.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// dataConn is the net.PacketConn view of a Mux's non-STUN traffic.
type dataConn struct {
	m *Mux

	mu       sync.Mutex
	queue    []response
	wake     chan struct{} // closed and replaced when the queue gains a packet
	closed   bool
	deadline time.Time
	dlWake   chan struct{} // closed and replaced when the deadline changes
}

func newDataConn(m *Mux) *dataConn {
	return &dataConn{m: m, wake: make(chan struct{}), dlWake: make(chan struct{})}
}

func (d *dataConn) enqueue(b []byte, from netip.AddrPort) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || len(d.queue) >= DataQueue {
		return
	}
	msg := make([]byte, len(b)) // make and copy: no zeroing first
	copy(msg, b)
	d.queue = append(d.queue, response{msg: msg, from: from})
	close(d.wake)
	d.wake = make(chan struct{})
}

func (d *dataConn) closeQueue() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed {
		d.closed = true
		close(d.wake)
	}
}

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }
func (timeoutError) Unwrap() error   { return os.ErrDeadlineExceeded }

func (d *dataConn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		d.mu.Lock()
		if len(d.queue) > 0 {
			r := d.queue[0]
			d.queue[0] = response{}
			d.queue = d.queue[1:]
			d.mu.Unlock()
			n := copy(p, r.msg)
			return n, net.UDPAddrFromAddrPort(r.from), nil
		}
		if d.closed {
			d.mu.Unlock()
			return 0, nil, &net.OpError{Op: "read", Net: "udp", Err: net.ErrClosed}
		}
		wake, dlWake, dl := d.wake, d.dlWake, d.deadline
		d.mu.Unlock()
		var expired chan struct{}
		var t clock.Timer
		if !dl.IsZero() {
			wait := dl.Sub(d.m.clock.Now())
			if wait <= 0 {
				return 0, nil, &net.OpError{Op: "read", Net: "udp", Err: timeoutError{}}
			}
			expired = make(chan struct{})
			t = d.m.clock.AfterFunc(wait, func() { close(expired) })
		}
		select {
		case <-wake:
		case <-dlWake:
		case <-expired:
		}
		if t != nil {
			t.Stop()
		}
	}
}

func (d *dataConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	return d.m.conn.WriteTo(p, addr)
}

func (d *dataConn) Close() error                     { return d.m.Close() }
func (d *dataConn) LocalAddr() net.Addr              { return d.m.conn.LocalAddr() }
func (d *dataConn) SetDeadline(t time.Time) error    { return d.SetReadDeadline(t) }
func (d *dataConn) SetWriteDeadline(time.Time) error { return nil }
func (d *dataConn) SetReadDeadline(t time.Time) error {
	d.mu.Lock()
	d.deadline = t
	close(d.dlWake)
	d.dlWake = make(chan struct{})
	d.mu.Unlock()
	return nil
}
