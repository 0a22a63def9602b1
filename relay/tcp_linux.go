package relay

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// TURN over TCP and TLS: one goroutine reads each connection's stream of STUN and
// ChannelData frames; another writes what the loop queues for the client, so a slow
// client never stalls the loop.

const (
	// handshakeTimeout bounds a TLS handshake; idleConnTimeout closes a connection that
	// has no allocation and sends nothing, so idle sockets cannot pile up.
	handshakeTimeout = 10 * time.Second
	idleConnTimeout  = 60 * time.Second
	// maxQueued is how many bytes may wait for a slow TCP client before data for it is
	// dropped.
	maxQueued = 1 << 20
)

type tcpConn struct {
	srv       *Server
	raw       net.Conn // the TCP connection
	c         net.Conn // raw, or the TLS connection over it
	transport Transport
	alloc     atomic.Pointer[allocation]

	mu      sync.Mutex
	out     []byte
	closed  bool
	wake    chan struct{}
	closing sync.Once
}

func (s *Server) accept(ln net.Listener, t Transport) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			s.log.Warn("accept", "transport", t, "err", err)
			time.Sleep(50 * time.Millisecond) // e.g. EMFILE: back off rather than spin
			continue
		}
		tc := &tcpConn{srv: s, raw: c, c: c, transport: t, wake: make(chan struct{}, 1)}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[tc] = struct{}{}
		s.wg.Add(2)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			tc.writeLoop()
		}()
		go func() {
			defer s.wg.Done()
			tc.serve()
		}()
	}
}

// serve reads the client's frames until the connection ends, then ends its allocation.
func (tc *tcpConn) serve() {
	s := tc.srv
	defer func() {
		tc.close()
		// When the server shuts down, the loops end every allocation themselves.
		if a := tc.alloc.Load(); a != nil && !s.closing.Load() {
			s.deleteAlloc(nil, a, "closed")
		}
		s.mu.Lock()
		delete(s.conns, tc)
		s.mu.Unlock()
	}()
	if tc.transport == TLS {
		tlsConn := tls.Server(tc.c, s.cfg.TLSConfig)
		ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
		err := tlsConn.HandshakeContext(ctx)
		cancel()
		if err != nil {
			s.log.Debug("tls handshake", "client", tc.c.RemoteAddr(), "err", err)
			return
		}
		tc.mu.Lock()
		tc.c = tlsConn
		tc.mu.Unlock()
	}
	rc := &reqCtx{transport: tc.transport, client: tc.c.RemoteAddr().(*net.TCPAddr).AddrPort(), tc: tc}
	rc.client = unmapAddrPort(rc.client)
	c := tc.conn()
	// ChannelData before an allocation is a protocol error; failing at its header
	// rather than waiting for its body also turns away other protocols at once (an
	// HTTP request line reads as a ChannelData header).
	fr := frameReader{r: c, dataOK: func() bool { return tc.alloc.Load() != nil }}
	deadline := true
	for {
		// Without an allocation a connection must keep talking; with one, the
		// allocation's lifetime bounds it.
		if has := tc.alloc.Load() != nil; !has || deadline {
			if has {
				c.SetReadDeadline(time.Time{})
			} else {
				c.SetReadDeadline(time.Now().Add(idleConnTimeout))
			}
			deadline = !has
		}
		f, err := fr.next()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Debug("tcp client", "client", rc.client, "err", err)
			}
			if errors.Is(err, ErrMalformed) {
				s.tcpCtr.drops[DropMalformed].Add(1)
			}
			return
		}
		tc.frame(rc, f)
	}
}

// conn returns the connection after any TLS handshake.
func (tc *tcpConn) conn() net.Conn {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return tc.c
}

// frame handles one frame from the client.
func (tc *tcpConn) frame(rc *reqCtx, f []byte) {
	s := tc.srv
	a := tc.alloc.Load()
	if isChannelData(f) {
		if a == nil {
			s.tcpCtr.drops[DropNoAllocation].Add(1)
			return
		}
		ch, payload, err := parseChannelData(f)
		if err != nil {
			s.tcpCtr.drops[DropMalformed].Add(1)
			return
		}
		r := a.routes.Load().byNumber(ch)
		switch {
		case r == nil:
			s.tcpCtr.drops[DropNoChannel].Add(1)
		case !r.ok:
			s.tcpCtr.drops[DropNoPermission].Add(1)
		default:
			tc.toPeer(a, payload, r.peer, &r.sa)
		}
		return
	}
	if binary.BigEndian.Uint16(f) == typeSendIndication {
		if a == nil {
			s.tcpCtr.drops[DropNoAllocation].Add(1)
			return
		}
		peer, data, ok := parseSendIndication(f)
		if !ok {
			s.tcpCtr.drops[DropMalformed].Add(1)
			return
		}
		if _, ok := a.routes.Load().perms[peer.ip]; !ok || peer.is4() == a.rs.v6 {
			s.tcpCtr.drops[DropNoPermission].Add(1)
			return
		}
		sa := sockaddrOf(peer, a.rs.v6)
		tc.toPeer(a, data, peer, &sa)
		return
	}
	rc.alloc = a
	rc.now = s.clock.Now()
	if resp := s.handle(rc, f); resp != nil {
		tc.enqueue(resp, true)
	}
}

// toPeer relays a TCP client's payload. The relayed socket belongs to a loop, so the
// send holds its lock against the loop closing it.
func (tc *tcpConn) toPeer(a *allocation, payload []byte, peer addrKey, sa *sockaddr) {
	s := tc.srv
	if s.isSelf(peer) {
		s.tcpCtr.drops[DropForbidden].Add(1)
		return
	}
	if r, ok := a.admit(len(payload), int64(s.clock.Now().Sub(s.epoch))); !ok {
		s.tcpCtr.drops[r].Add(1)
		return
	}
	a.rs.mu.RLock()
	err := net.ErrClosed
	if !a.rs.closed {
		err = sendto(a.rs.fd, payload, sa)
	}
	a.rs.mu.RUnlock()
	if err != nil {
		s.tcpCtr.drops[DropSendError].Add(1)
		return
	}
	a.bytesIn.Add(uint64(len(payload)))
	a.pktsIn.Add(1)
	s.tcpCtr.bytesToPeers.Add(uint64(len(payload)))
	s.tcpCtr.pktsToPeers.Add(1)
}

// enqueue copies a frame into the connection's send queue. Data frames are dropped
// (false) when the client has fallen maxQueued bytes behind; responses always go.
func (tc *tcpConn) enqueue(b []byte, control bool) bool {
	tc.mu.Lock()
	if tc.closed || !control && len(tc.out)+len(b) > maxQueued {
		tc.mu.Unlock()
		return false
	}
	tc.out = append(tc.out, b...)
	select {
	case tc.wake <- struct{}{}:
	default:
	}
	tc.mu.Unlock()
	return true
}

func (tc *tcpConn) writeLoop() {
	var buf []byte
	for range tc.wake {
		tc.mu.Lock()
		buf, tc.out = tc.out, buf[:0]
		c := tc.c
		tc.mu.Unlock()
		if len(buf) == 0 {
			continue
		}
		if _, err := c.Write(buf); err != nil {
			tc.close()
		}
	}
}

// close closes the connection once; the reader and writer then end. It closes the TCP
// connection under any TLS, which never blocks (a TLS close would send an alert, and
// the loop may be the caller).
func (tc *tcpConn) close() {
	tc.closing.Do(func() {
		tc.mu.Lock()
		tc.closed = true
		close(tc.wake)
		tc.mu.Unlock()
		tc.raw.Close()
	})
}

// allocationEnded is called by the loop when the connection's allocation ended. A
// client that deleted it may allocate again; one whose allocation expired or timed out
// is gone or misbehaving, and its connection closes.
func (tc *tcpConn) allocationEnded(a *allocation, reason string) {
	tc.alloc.CompareAndSwap(a, nil)
	if reason != "deleted" && reason != "closed" {
		tc.close()
	}
}
