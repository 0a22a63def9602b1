package signal

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"peerlink/identity"
)

// RelayAddr names one end of a relay session. A RelayConn's RemoteAddr is the peer's
// node (Session 0: the peer's session number is the server's business); its LocalAddr
// is this node and the session number.
type RelayAddr struct {
	Node    identity.NodeID
	Session uint32
}

// Network returns "peerlink-relay".
func (a RelayAddr) Network() string { return "peerlink-relay" }

func (a RelayAddr) String() string {
	if a.Session == 0 {
		return a.Node.String()
	}
	return a.Node.String() + "/" + strconv.FormatUint(uint64(a.Session), 10)
}

// RelayConnStats are one relay session's counters, in datagrams and payload bytes.
type RelayConnStats struct {
	Sent, SentBytes         uint64 // queued for the server
	SendDropped             uint64 // dropped because the client's send queue was full
	Received, ReceivedBytes uint64 // queued for ReadFrom/Recv
	RecvDropped             uint64 // dropped because the session's receive queue was full
}

// RelayConn is a relay session to one peer through the rendezvous server: a datagram
// path for when no UDP or TURN path works, carried in binary frames over the client's
// WebSocket (and so through any HTTP proxy Dial went through). It is a net.PacketConn
// whose only remote is the peer. Datagrams are not reliable: when a queue on the way is
// full (here, at the server, or at the peer) they are dropped and counted, as UDP would,
// so send congestion-controlled traffic (QUIC) over it. The server sees only what is
// sent, so send only what is encrypted end to end.
type RelayConn struct {
	c      *Client
	sid    uint32
	peer   identity.NodeID
	tag    string
	opener bool
	in     chan []byte

	done chan struct{}
	once sync.Once
	mu   sync.Mutex
	err  error
	rd   deadline

	sent, sentBytes, sendDropped, received, receivedBytes, recvDropped atomic.Uint64
}

// clientRelay is a Client's relay state.
type clientRelay struct {
	mu       sync.Mutex
	conns    map[uint32]*RelayConn
	incoming chan *RelayConn
	ctl      [][]byte // text frames for the writer, sent before datagrams
	q, spare [][]byte // framed datagrams
	qBytes   int
	wake     chan struct{}
	bad      atomic.Uint64
}

func (c *Client) newRelayConn(sid uint32, peer identity.NodeID, tag string, opener bool) *RelayConn {
	rc := &RelayConn{c: c, sid: sid, peer: peer, tag: tag, opener: opener, in: make(chan []byte, c.opts.RelayRecvQueue), done: make(chan struct{})}
	rc.rd.init()
	c.rl.mu.Lock()
	if c.rl.conns == nil {
		c.rl.conns = make(map[uint32]*RelayConn)
	}
	c.rl.conns[sid] = rc
	c.rl.mu.Unlock()
	return rc
}

// OpenRelay opens a relay session to target through the server and returns once target
// accepted it. It fails with ErrPeerOffline when target is not connected to any server
// sharing this one's store, ErrRelayRefused when it refused, ErrRelayTimeout when it did
// not answer, ErrTooManySessions or ErrRelayUnavailable.
func (c *Client) OpenRelay(ctx context.Context, target identity.NodeID) (*RelayConn, error) {
	return c.OpenRelayTag(ctx, target, "")
}

// OpenRelayTag is OpenRelay with a tag the target sees (RelayConn.Tag), so it can tell
// what the session is for; 1 to 64 of A-Z a-z 0-9 - _ . : (a signaling session ID, say).
func (c *Client) OpenRelayTag(ctx context.Context, target identity.NodeID, tag string) (*RelayConn, error) {
	f, err := c.request(ctx, TypeRelayOpen, relayOpenBody{NodeID: target.String(), Tag: tag}, TypeRelayReady)
	if err != nil {
		return nil, err
	}
	var b relaySessionBody
	if err := json.Unmarshal(f.Body, &b); err != nil {
		return nil, errorf(CodeMalformed, "relayReady: %v", err)
	}
	c.rl.mu.Lock()
	rc := c.rl.conns[b.Session]
	c.rl.mu.Unlock()
	if rc == nil {
		return nil, errorf(CodeRelayClosed, "relay session to %s closed as it opened", target.Short())
	}
	return rc, nil
}

// AcceptRelay accepts the next relay session another node opened to this one. Sessions
// wait for it in a backlog (Options.RelayBacklog); the server closes those not accepted
// within its open timeout.
func (c *Client) AcceptRelay(ctx context.Context) (*RelayConn, error) {
	for {
		var rc *RelayConn
		select {
		case rc = <-c.rl.incoming:
		case <-c.done:
			return nil, c.Err()
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if rc.Err() != nil {
			continue // the opener gave up, or the server timed it out
		}
		_, err := c.request(ctx, TypeRelayReady, relaySessionBody{Session: rc.sid}, TypeOK)
		if err == nil {
			return rc, nil
		}
		var e *Error
		if errors.As(err, &e) {
			rc.end(e, false)
			continue
		}
		rc.end(err, true)
		return nil, err
	}
}

// relayFrame handles the relay's text frames from the server; it reports whether f was
// one.
func (c *Client) relayFrame(f Frame) bool {
	switch f.Type {
	case TypeRelayIncoming:
		var b relaySessionBody
		if err := json.Unmarshal(f.Body, &b); err != nil || b.Session == 0 {
			c.log.Warn("bad relayIncoming from server", "err", err)
			return true
		}
		peer, err := identity.ParseNodeID(b.NodeID)
		if err != nil {
			c.log.Warn("bad relayIncoming from server", "err", err)
			return true
		}
		if c.opts.RelayFilter != nil && !c.opts.RelayFilter(peer, b.Tag) {
			c.relayControl(TypeRelayClose, relayCloseBody{Session: b.Session, Reason: "refused"})
			return true
		}
		rc := c.newRelayConn(b.Session, peer, b.Tag, false)
		select {
		case c.rl.incoming <- rc:
		default:
			rc.end(errorf(CodeRelayRefused, "backlog full"), true)
		}
		return true
	case TypeRelayClosed:
		var b relayClosedBody
		if err := json.Unmarshal(f.Body, &b); err != nil {
			c.log.Warn("bad relayClosed from server", "err", err)
			return true
		}
		c.rl.mu.Lock()
		rc := c.rl.conns[b.Session]
		c.rl.mu.Unlock()
		if rc != nil {
			rc.end(&Error{Code: b.Code, Message: b.Message}, false)
		}
		return true
	case TypeRelayReady:
		if f.ID == 0 {
			return true
		}
		// The answer to OpenRelay: the session exists from here on, so datagrams right
		// behind this frame find it.
		var b relaySessionBody
		peer, err := identity.NodeID{}, json.Unmarshal(f.Body, &b)
		if err == nil {
			peer, err = identity.ParseNodeID(b.NodeID)
		}
		if err != nil || b.Session == 0 {
			c.log.Warn("bad relayReady from server", "err", err)
			return false // let the waiting request see it
		}
		c.newRelayConn(b.Session, peer, b.Tag, true)
		return false
	}
	return false
}

// abandoned handles an answer whose request was given up (its context ended): a
// session opened for nobody is closed.
func (c *Client) abandoned(f Frame) {
	if f.Type != TypeRelayReady {
		return
	}
	var b relaySessionBody
	if json.Unmarshal(f.Body, &b) != nil {
		return
	}
	c.rl.mu.Lock()
	rc := c.rl.conns[b.Session]
	c.rl.mu.Unlock()
	if rc != nil {
		rc.end(net.ErrClosed, true)
	}
}

// relayData hands a binary message's datagrams to their sessions.
func (c *Client) relayData(msg []byte) {
	c.rl.mu.Lock()
	defer c.rl.mu.Unlock()
	for len(msg) > 0 {
		f, rest, err := nextRelayFrame(msg)
		if err != nil {
			c.rl.bad.Add(1)
			c.log.Warn("bad relay frame from server", "err", err)
			return
		}
		msg = rest
		rc := c.rl.conns[f.Session]
		if rc == nil {
			c.rl.bad.Add(1) // a session that just closed, or one still opening
			continue
		}
		// Counted before the reader can see it, so Stats never lags what was read.
		rc.received.Add(1)
		rc.receivedBytes.Add(uint64(len(f.Payload)))
		select {
		case rc.in <- f.Payload:
		default:
			rc.received.Add(^uint64(0))
			rc.receivedBytes.Add(-uint64(len(f.Payload)))
			rc.recvDropped.Add(1)
		}
	}
}

// relayControl queues a text frame for the relay writer, without an answer awaited.
func (c *Client) relayControl(t Type, body any) {
	b, err := json.Marshal(body)
	if err != nil {
		return
	}
	f := AppendFrame(nil, c.nextID.Add(1), t, b)
	c.rl.mu.Lock()
	c.rl.ctl = append(c.rl.ctl, f)
	c.rl.mu.Unlock()
	select {
	case c.rl.wake <- struct{}{}:
	default:
	}
}

// relayWriteLoop writes relay traffic: control frames, then queued datagrams packed into
// binary messages up to the server's frame limit.
func (c *Client) relayWriteLoop() {
	var buf []byte
	for {
		select {
		case <-c.done:
			return
		case <-c.rl.wake:
		}
		c.rl.mu.Lock()
		ctl, q := c.rl.ctl, c.rl.q
		c.rl.ctl, c.rl.q, c.rl.spare = nil, c.rl.spare, nil
		c.rl.mu.Unlock()
		ok := true
		for _, f := range ctl {
			if ok = c.write(websocket.MessageText, f); !ok {
				break
			}
		}
		released := 0
		buf = buf[:0]
		for _, f := range q {
			released += len(f)
			if !ok {
				continue
			}
			if len(buf) > 0 && len(buf)+len(f) > c.maxFrame {
				ok = c.write(websocket.MessageBinary, buf)
				buf = buf[:0]
			}
			buf = append(buf, f...)
		}
		if ok && len(buf) > 0 {
			ok = c.write(websocket.MessageBinary, buf)
		}
		c.rl.mu.Lock()
		c.rl.qBytes -= released
		clear(q)
		if c.rl.spare == nil {
			c.rl.spare = q[:0]
		}
		c.rl.mu.Unlock()
		if !ok {
			return
		}
	}
}

func (c *Client) write(t websocket.MessageType, b []byte) bool {
	// Not a caller's context: a write cut short by one closes the whole connection.
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.WriteTimeout)
	err := c.ws.Write(ctx, t, b)
	cancel()
	if err != nil {
		c.log.Debug("relay write failed", "err", err)
		c.ws.CloseNow()
		return false
	}
	return true
}

// Peer returns the node at the other end.
func (rc *RelayConn) Peer() identity.NodeID { return rc.peer }

// Tag returns the opener's tag ("" if none).
func (rc *RelayConn) Tag() string { return rc.tag }

// Session returns this end's session number on the client's connection.
func (rc *RelayConn) Session() uint32 { return rc.sid }

// Opener reports whether this node opened the session.
func (rc *RelayConn) Opener() bool { return rc.opener }

// Done is closed when the session has ended; Err says why.
func (rc *RelayConn) Done() <-chan struct{} { return rc.done }

// Err returns why the session ended (net.ErrClosed after Close; the server's reason as
// an *Error, such as ErrRelayClosed when the peer closed or left; the client's error
// when its connection ended), or nil while it is up.
func (rc *RelayConn) Err() error {
	select {
	case <-rc.c.done:
		rc.end(rc.c.Err(), false)
	default:
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.err
}

// closedErr is what reads and writes return once the session ended: it matches
// net.ErrClosed, so packet loops stop, and the reason.
func (rc *RelayConn) closedErr() error {
	err := rc.Err()
	if err == nil || errors.Is(err, net.ErrClosed) {
		return net.ErrClosed
	}
	return fmt.Errorf("%w: relay session to %s: %w", net.ErrClosed, rc.peer.Short(), err)
}

// end finishes the session once; tellServer sends relayClose.
func (rc *RelayConn) end(err error, tellServer bool) {
	rc.once.Do(func() {
		rc.mu.Lock()
		rc.err = err
		rc.mu.Unlock()
		close(rc.done)
		c := rc.c
		c.rl.mu.Lock()
		if c.rl.conns[rc.sid] == rc {
			delete(c.rl.conns, rc.sid)
		}
		c.rl.mu.Unlock()
		select {
		case <-c.done:
		default:
			if tellServer {
				reason := ""
				var e *Error
				if errors.As(err, &e) {
					reason = e.Message
				}
				c.relayControl(TypeRelayClose, relayCloseBody{Session: rc.sid, Reason: reason})
			}
		}
	})
}

// Close ends the session and tells the server, which tells the peer. It is idempotent.
func (rc *RelayConn) Close() error {
	rc.end(net.ErrClosed, true)
	return nil
}

// Send queues datagram p (copied) for the peer. Like UDP, a datagram that does not fit
// the send queue is dropped and counted, not an error. It fails for an empty datagram
// or one over MaxRelayPayload, and once the session ended.
func (rc *RelayConn) Send(p []byte) error {
	if rc.Err() != nil {
		return rc.closedErr()
	}
	if len(p) == 0 || len(p) > MaxRelayPayload {
		return errorf(CodeTooLarge, "relay datagrams are 1 to %d bytes, not %d", MaxRelayPayload, len(p))
	}
	c := rc.c
	n := len(p) + RelayHeaderLen
	c.rl.mu.Lock()
	if c.rl.qBytes+n > c.opts.RelaySendQueue {
		c.rl.mu.Unlock()
		rc.sendDropped.Add(1)
		return nil
	}
	c.rl.q = append(c.rl.q, AppendRelayFrame(make([]byte, 0, n), rc.sid, p))
	c.rl.qBytes += n
	c.rl.mu.Unlock()
	rc.sent.Add(1)
	rc.sentBytes.Add(uint64(len(p)))
	select {
	case c.rl.wake <- struct{}{}:
	default:
	}
	return nil
}

// Recv returns the next datagram from the peer.
func (rc *RelayConn) Recv(ctx context.Context) ([]byte, error) {
	select {
	case p := <-rc.in:
		return p, nil
	default:
	}
	select {
	case p := <-rc.in:
		return p, nil
	case <-rc.done:
	case <-rc.c.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return nil, rc.closedErr()
}

// ReadFrom reads the next datagram into p (truncating it, as UDP does, if p is short);
// addr is the peer's RelayAddr. It obeys the read deadline.
func (rc *RelayConn) ReadFrom(p []byte) (int, net.Addr, error) {
	var b []byte
	select {
	case b = <-rc.in:
	default:
		select {
		case b = <-rc.in:
		case <-rc.done:
			return 0, nil, rc.closedErr()
		case <-rc.c.done:
			return 0, nil, rc.closedErr()
		case <-rc.rd.wait():
			return 0, nil, os.ErrDeadlineExceeded
		}
	}
	return copy(p, b), rc.RemoteAddr(), nil
}

// WriteTo sends p to the peer, as Send; addr is ignored, there being one peer.
func (rc *RelayConn) WriteTo(p []byte, _ net.Addr) (int, error) {
	if err := rc.Send(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// LocalAddr returns this node and session number.
func (rc *RelayConn) LocalAddr() net.Addr { return RelayAddr{Node: rc.c.NodeID(), Session: rc.sid} }

// RemoteAddr returns the peer's node.
func (rc *RelayConn) RemoteAddr() net.Addr { return RelayAddr{Node: rc.peer} }

// SetDeadline sets the read deadline; writes never block.
func (rc *RelayConn) SetDeadline(t time.Time) error { return rc.SetReadDeadline(t) }

// SetReadDeadline makes ReadFrom fail with os.ErrDeadlineExceeded from t on; zero
// means no deadline.
func (rc *RelayConn) SetReadDeadline(t time.Time) error {
	rc.rd.set(t)
	return nil
}

// SetWriteDeadline does nothing: writes queue or drop, never block.
func (rc *RelayConn) SetWriteDeadline(time.Time) error { return nil }

// Stats returns the session's counters.
func (rc *RelayConn) Stats() RelayConnStats {
	return RelayConnStats{
		Sent: rc.sent.Load(), SentBytes: rc.sentBytes.Load(), SendDropped: rc.sendDropped.Load(),
		Received: rc.received.Load(), ReceivedBytes: rc.receivedBytes.Load(), RecvDropped: rc.recvDropped.Load(),
	}
}

var _ net.PacketConn = (*RelayConn)(nil)

// deadline is a read deadline as a channel closed when it passes.
type deadline struct {
	mu    sync.Mutex
	timer *time.Timer
	ch    chan struct{}
	fired bool
	gen   uint64 // which set a timer belongs to
}

func (d *deadline) init() { d.ch = make(chan struct{}) }

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gen++
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	if d.fired {
		d.ch, d.fired = make(chan struct{}), false
	}
	if t.IsZero() {
		return
	}
	ch, gen := d.ch, d.gen
	fire := func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.gen == gen && !d.fired {
			d.fired = true
			close(ch)
		}
	}
	if dur := time.Until(t); dur > 0 {
		d.timer = time.AfterFunc(dur, fire)
		return
	}
	d.fired = true
	close(ch)
}

func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ch
}
