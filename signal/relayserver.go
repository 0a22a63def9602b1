package signal

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/store"
)

// RelayConfig configures relaying through the rendezvous server, the last-resort path
// for peers that have no UDP or TURN route. The server only forwards datagrams; peer
// traffic is already encrypted end to end, so it sees ciphertext. The zero value relays,
// with the limits below.
type RelayConfig struct {
	// Disabled makes the server answer relayOpen with relay_unavailable.
	Disabled bool
	// Rate is each node's relay bandwidth in bytes per second, applied separately to
	// what it sends and to what it receives (a token bucket each way); datagrams over
	// it are dropped and counted. Zero means 4 MiB/s; negative means no limit.
	Rate float64
	// Burst is the depth of those buckets in bytes; zero means 256 KiB.
	Burst int
	// NodeQueue bounds the bytes of datagrams waiting for one connection's writer.
	// Datagrams that do not fit are dropped and counted, never buffered: peer traffic
	// is QUIC, which recovers, so a slow receiver costs the server at most this much.
	// Zero means 512 KiB.
	NodeQueue int
	// SessionQueue bounds one session's share of its receiver's queue, so one busy
	// session cannot starve a node's others; zero means 128 KiB.
	SessionQueue int
	// RouteQueue bounds the bytes waiting to go to other servers through the store;
	// zero means 4 MiB.
	RouteQueue int
	// MaxSessions is how many sessions one connection may have open or opening; zero
	// means 32.
	MaxSessions int
	// OpenTimeout is how long a target has to accept a session; zero means 10 s.
	OpenTimeout time.Duration
	// FloodFactor closes, with relay_flood, a session whose sender offers more than
	// FloodFactor × Rate + Burst bytes within one second. Congestion-controlled
	// traffic backs off long before that. Zero means 4; negative never closes. It has
	// no effect when Rate is unlimited.
	FloodFactor float64
}

func (r *RelayConfig) setDefaults() {
	r.Rate = cmp.Or(r.Rate, 4<<20)
	r.Burst = cmp.Or(r.Burst, 256<<10)
	r.NodeQueue = cmp.Or(r.NodeQueue, 512<<10)
	r.SessionQueue = cmp.Or(r.SessionQueue, 128<<10)
	r.RouteQueue = cmp.Or(r.RouteQueue, 4<<20)
	r.MaxSessions = cmp.Or(r.MaxSessions, 32)
	r.OpenTimeout = cmp.Or(r.OpenTimeout, 10*time.Second)
	r.FloodFactor = cmp.Or(r.FloodFactor, 4)
}

// floodLimit is the bytes a session may offer in one second before it is closed; 0
// means no limit.
func (r *RelayConfig) floodLimit() float64 {
	if r.Rate < 0 || r.FloodFactor < 0 {
		return 0
	}
	return r.FloodFactor*r.Rate + float64(r.Burst)
}

// RelayStats are a server's relay counters.
type RelayStats struct {
	Sessions     int64  // session ends open on this server (a session within one server counts twice)
	Opened       uint64 // sessions the target accepted
	Forwarded    uint64 // datagrams accepted into a receiver's or another server's queue
	Delivered    uint64 // datagrams written to a receiver
	DeliveredB   uint64 // their payload bytes
	QueueDropped uint64 // datagrams dropped because a queue was full
	RateDropped  uint64 // datagrams dropped by a node's bandwidth limit
	Floods       uint64 // sessions closed with relay_flood
	BadFrames    uint64 // malformed relay frames and frames for sessions never opened
	Queued       int64  // bytes of datagrams waiting now, in every queue
	QueuedPeak   int64  // the most Queued has been
}

// serverRelay is a Server's relay state.
type serverRelay struct {
	mu      sync.Mutex
	router  *relayRouter
	stopped bool

	sessions, queued, peak                       atomic.Int64
	opened, forwarded, delivered, deliveredB     atomic.Uint64
	queueDropped, rateDropped, floods, badFrames atomic.Uint64
}

func (r *serverRelay) addQueued(n int) {
	q := r.queued.Add(int64(n))
	for {
		p := r.peak.Load()
		if q <= p || r.peak.CompareAndSwap(p, q) {
			return
		}
	}
}

// RelayStats returns the server's relay counters.
func (s *Server) RelayStats() RelayStats {
	r := &s.rl
	return RelayStats{
		Sessions:     r.sessions.Load(),
		Opened:       r.opened.Load(),
		Forwarded:    r.forwarded.Load(),
		Delivered:    r.delivered.Load(),
		DeliveredB:   r.deliveredB.Load(),
		QueueDropped: r.queueDropped.Load(),
		RateDropped:  r.rateDropped.Load(),
		Floods:       r.floods.Load(),
		BadFrames:    r.badFrames.Load(),
		Queued:       r.queued.Load(),
		QueuedPeak:   r.peak.Load(),
	}
}

type legState uint8

const (
	legOpening legState = iota // the opener's end, waiting for the target
	legOffered                 // the target's end, waiting for its relayReady
	legActive
	legClosed
)

// relayLeg is one end of a relay session: a session number on one connection, paired
// with the peer's end (peer, peerSid) on this or another server. Fields change under
// the owning connection's relay lock; sid, peer and tag never change.
type relayLeg struct {
	sid      uint32
	peer     identity.NodeID
	tag      string
	peerSid  uint32 // 0 while the opener waits for the target's session
	state    legState
	reqID    uint64 // the opener's relayOpen request, answered by relayReady
	timer    clock.Timer
	peerConn *conn // the peer's connection when it is on this server
	queued   int   // bytes of this session waiting for the client
	dead     atomic.Bool

	// Flood window of what the client offers; touched by the reader only.
	winAt    time.Time
	winBytes float64
}

// relayItem is a datagram waiting for a connection's writer.
type relayItem struct {
	leg *relayLeg
	p   []byte
}

// connRelay is a connection's relay state.
type connRelay struct {
	mu       sync.Mutex
	legs     map[uint32]*relayLeg
	recent   [64]uint32 // sessions closed lately: their late frames are dropped quietly
	recentAt int
	gone     bool // the connection ended
	q, spare []relayItem
	qBytes   int
	outTok   float64 // bucket of what the client receives
	outAt    time.Time
	wake     chan struct{}

	// Reader-owned.
	inTok float64
	inAt  time.Time
	rbuf  []byte
	// Writer-owned.
	wbuf []byte
}

func (r *connRelay) remember(sid uint32) {
	r.recent[r.recentAt] = sid
	r.recentAt = (r.recentAt + 1) % len(r.recent)
}

func (r *connRelay) recentlyClosed(sid uint32) bool {
	for _, s := range r.recent {
		if s == sid {
			return true
		}
	}
	return false
}

func (c *conn) initRelay(now time.Time) {
	c.rl.wake = make(chan struct{}, 1)
	c.rl.inTok, c.rl.outTok = float64(c.s.cfg.Relay.Burst), float64(c.s.cfg.Relay.Burst)
	c.rl.inAt, c.rl.outAt = now, now
}

// trySend queues a frame the client must get, reporting whether it fit.
func (c *conn) trySend(f []byte) bool {
	if f == nil || c.failed.Load() {
		return false
	}
	select {
	case c.out <- f:
		return true
	default:
		return false
	}
}

// newLeg adds leg to the connection under a fresh session number.
func (c *conn) newLeg(leg *relayLeg) *Error {
	cfg := &c.s.cfg.Relay
	rl := &c.rl
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.gone {
		return errorf(CodePeerOffline, "%s is disconnecting", c.id.Short())
	}
	if len(rl.legs) >= cfg.MaxSessions {
		return errorf(CodeTooManySessions, "%s has %d relay sessions (limit %d)", c.id.Short(), len(rl.legs), cfg.MaxSessions)
	}
	if rl.legs == nil {
		rl.legs = make(map[uint32]*relayLeg)
	}
	// Random, not counted, so a session number is not reused soon after it closed,
	// when the peer may still be sending on it.
	for leg.sid == 0 || rl.legs[leg.sid] != nil || rl.recentlyClosed(leg.sid) {
		leg.sid = rand.Uint32()
	}
	rl.legs[leg.sid] = leg
	leg.timer = c.s.clock.AfterFunc(cfg.OpenTimeout, func() {
		c.rl.mu.Lock()
		waiting := leg.state == legOpening || leg.state == legOffered
		c.rl.mu.Unlock()
		if waiting {
			c.closeLeg(leg, CodeRelayTimeout, "the target did not accept within "+cfg.OpenTimeout.String(), true, true)
		}
	})
	c.s.rl.sessions.Add(1)
	return nil
}

// closeLeg ends leg. tellClient sends the client the reason (an error answering its
// relayOpen when it was still opening); tellPeer tells the peer's end.
func (c *conn) closeLeg(leg *relayLeg, code Code, msg string, tellClient, tellPeer bool) {
	rl := &c.rl
	rl.mu.Lock()
	if rl.legs[leg.sid] != leg {
		rl.mu.Unlock()
		return
	}
	delete(rl.legs, leg.sid)
	rl.remember(leg.sid)
	prev := leg.state
	leg.state = legClosed
	leg.dead.Store(true)
	leg.timer.Stop()
	peerSid, peerConn, reqID := leg.peerSid, leg.peerConn, leg.reqID
	rl.mu.Unlock()
	c.s.rl.sessions.Add(-1)
	c.s.log.Debug("relay session closed", "node", c.id.Short(), "session", leg.sid, "peer", leg.peer.Short(), "code", code, "why", msg)
	if tellClient {
		if prev == legOpening {
			c.send(c.frame(reqID, TypeError, errorf(code, "%s", msg)))
		} else {
			c.send(c.frame(0, TypeRelayClosed, relayClosedBody{Session: leg.sid, Code: code, Message: msg}))
		}
	}
	if tellPeer {
		peerCode := code
		switch code {
		case CodeRelayFlood, CodeMalformed, CodeOverloaded:
			peerCode, msg = CodeRelayClosed, "the peer's end was closed: "+msg
		}
		c.s.relayClosePeer(leg.peer, peerSid, c.id, leg.sid, peerConn, peerCode, msg)
	}
}

// closeAllLegs ends every session of a connection that is going away.
func (c *conn) closeAllLegs() {
	rl := &c.rl
	rl.mu.Lock()
	rl.gone = true
	legs := make([]*relayLeg, 0, len(rl.legs))
	for _, l := range rl.legs {
		legs = append(legs, l)
	}
	released := rl.qBytes
	rl.q, rl.spare, rl.qBytes = nil, nil, 0
	rl.mu.Unlock()
	c.s.rl.addQueued(-released)
	for _, l := range legs {
		c.closeLeg(l, CodeRelayClosed, "the peer disconnected", false, true)
	}
}

// relayClosePeer tells the peer's end of a session that this end closed.
func (s *Server) relayClosePeer(peer identity.NodeID, peerSid uint32, from identity.NodeID, fromSid uint32, peerConn *conn, code Code, msg string) {
	if peerConn == nil {
		s.mu.Lock()
		peerConn = s.conns[peer]
		s.mu.Unlock()
	}
	if peerConn != nil {
		peerConn.relayCloseIn(peerSid, from, fromSid, code, msg)
		return
	}
	s.routeAsync(routeItem{to: peer, rec: appendCloseRec(nil, peerSid, from, fromSid, code, msg)})
}

// relayCloseIn ends this connection's end of a session because the peer's end closed.
func (c *conn) relayCloseIn(toSid uint32, from identity.NodeID, fromSid uint32, code Code, msg string) {
	rl := &c.rl
	rl.mu.Lock()
	var leg *relayLeg
	if toSid != 0 {
		leg = rl.legs[toSid]
	} else {
		for _, l := range rl.legs {
			if l.peer == from && l.peerSid == fromSid {
				leg = l
			}
		}
	}
	ok := leg != nil && leg.peer == from && (leg.peerSid == fromSid || leg.state == legOpening)
	rl.mu.Unlock()
	if ok {
		c.closeLeg(leg, code, msg, true, false)
	}
}

// relayOpen handles a client's relayOpen.
func (c *conn) relayOpen(f Frame) {
	var b relayOpenBody
	if err := json.Unmarshal(f.Body, &b); err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "relayOpen: %v", err))
		return
	}
	peer, err := identity.ParseNodeID(b.NodeID)
	if err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "relayOpen: %v", err))
		return
	}
	if b.Tag != "" && !validSession(b.Tag) {
		c.reject(f.ID, errorf(CodeMalformed, "relayOpen: tag must be 1 to %d of A-Z a-z 0-9 - _ . :", MaxSessionLen))
		return
	}
	if peer == c.id {
		c.reject(f.ID, errorf(CodeInvalid, "relayOpen: a node cannot relay to itself"))
		return
	}
	if c.s.cfg.Relay.Disabled {
		c.replyError(f.ID, errorf(CodeRelayUnavailable, "this server does not relay"))
		return
	}
	if e := c.s.checkShared(c.id, peer); e != nil {
		c.replyError(f.ID, e)
		return
	}
	leg := &relayLeg{peer: peer, tag: b.Tag, state: legOpening, reqID: f.ID}
	if e := c.newLeg(leg); e != nil {
		c.replyError(f.ID, e)
		return
	}
	if e := c.s.relayOpenTo(peer, c, leg.sid, b.Tag); e != nil {
		c.closeLeg(leg, e.Code, e.Message, false, e.Code != CodePeerOffline)
		c.replyError(f.ID, e)
	}
}

// relayOpenTo offers a session from (from, fromSid) to peer, wherever it is connected.
func (s *Server) relayOpenTo(peer identity.NodeID, from *conn, fromSid uint32, tag string) *Error {
	s.mu.Lock()
	tc := s.conns[peer]
	s.mu.Unlock()
	if tc != nil {
		return tc.relayIncoming(from.id, fromSid, tag, from)
	}
	return s.routeSync(peer, appendOpenRec([]byte{relayInternal}, from.id, fromSid, tag))
}

// relayIncoming offers the client a session from (from, fromSid); fromConn is the
// opener's connection when it is on this server.
func (c *conn) relayIncoming(from identity.NodeID, fromSid uint32, tag string, fromConn *conn) *Error {
	if c.failed.Load() {
		return errorf(CodePeerOffline, "%s is not connected", c.id.Short())
	}
	leg := &relayLeg{peer: from, peerSid: fromSid, tag: tag, state: legOffered, peerConn: fromConn}
	if e := c.newLeg(leg); e != nil {
		return e
	}
	if !c.trySend(c.frame(0, TypeRelayIncoming, relaySessionBody{Session: leg.sid, NodeID: from.String(), Tag: tag})) {
		c.closeLeg(leg, CodeOverloaded, "not reading", false, false)
		return errorf(CodeOverloaded, "%s is not keeping up", c.id.Short())
	}
	return nil
}

// relayAccept handles the target's relayReady.
func (c *conn) relayAccept(f Frame) {
	var b relaySessionBody
	if err := json.Unmarshal(f.Body, &b); err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "relayReady: %v", err))
		return
	}
	rl := &c.rl
	rl.mu.Lock()
	leg := rl.legs[b.Session]
	recent := rl.recentlyClosed(b.Session)
	if leg == nil || leg.state != legOffered {
		rl.mu.Unlock()
		switch {
		case leg != nil:
			c.reject(f.ID, errorf(CodeInvalid, "relay session %d is not waiting to be accepted", b.Session))
		case recent:
			c.replyError(f.ID, errorf(CodeRelayClosed, "relay session %d was closed", b.Session))
		default:
			c.s.rl.badFrames.Add(1)
			c.reject(f.ID, errorf(CodeUnknownSession, "relay session %d was never opened", b.Session))
		}
		return
	}
	// Active before the opener hears, so its first datagrams find this end ready.
	leg.state = legActive
	leg.timer.Stop()
	peer, peerSid, peerConn := leg.peer, leg.peerSid, leg.peerConn
	rl.mu.Unlock()
	var e *Error
	if peerConn != nil {
		e = peerConn.relayReadyIn(peerSid, c.id, leg.sid, c)
	} else {
		e = c.s.routeSync(peer, appendReadyRec([]byte{relayInternal}, peerSid, c.id, leg.sid))
	}
	if e != nil {
		msg := "the opener is gone (" + string(e.Code) + ")"
		c.closeLeg(leg, CodeRelayClosed, msg, false, false)
		c.replyError(f.ID, errorf(CodeRelayClosed, "%s", msg))
		return
	}
	c.send(AppendFrame(nil, f.ID, TypeOK, []byte("{}")))
}

// relayReadyIn completes the opener's end: the target accepted with (from, fromSid).
func (c *conn) relayReadyIn(toSid uint32, from identity.NodeID, fromSid uint32, fromConn *conn) *Error {
	rl := &c.rl
	rl.mu.Lock()
	leg := rl.legs[toSid]
	if leg == nil || leg.peer != from || leg.state != legOpening {
		rl.mu.Unlock()
		return errorf(CodeRelayClosed, "the opener gave up")
	}
	leg.state, leg.peerSid, leg.peerConn = legActive, fromSid, fromConn
	leg.timer.Stop()
	reqID := leg.reqID
	rl.mu.Unlock()
	c.s.rl.opened.Add(1)
	if !c.trySend(c.frame(reqID, TypeRelayReady, relaySessionBody{Session: leg.sid, NodeID: from.String(), Tag: leg.tag})) {
		c.closeLeg(leg, CodeOverloaded, "not reading", false, false)
		return errorf(CodeOverloaded, "the opener is not keeping up")
	}
	return nil
}

// relayClose handles a client's relayClose: the end of a session, or a refusal.
func (c *conn) relayClose(f Frame) {
	var b relayCloseBody
	if err := json.Unmarshal(f.Body, &b); err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "relayClose: %v", err))
		return
	}
	rl := &c.rl
	rl.mu.Lock()
	leg := rl.legs[b.Session]
	recent := rl.recentlyClosed(b.Session)
	state := legClosed
	if leg != nil {
		state = leg.state
	}
	rl.mu.Unlock()
	if leg == nil {
		if recent {
			c.send(AppendFrame(nil, f.ID, TypeOK, []byte("{}")))
			return
		}
		c.s.rl.badFrames.Add(1)
		c.reject(f.ID, errorf(CodeUnknownSession, "relay session %d was never opened", b.Session))
		return
	}
	code, msg := CodeRelayClosed, "closed by the peer"
	if state == legOffered {
		code, msg = CodeRelayRefused, "refused by the target"
	}
	if r := clipString(b.Reason, MaxReasonLen); r != "" {
		msg += ": " + r
	}
	c.closeLeg(leg, code, msg, false, true)
	c.send(AppendFrame(nil, f.ID, TypeOK, []byte("{}")))
}

// readBinary reads the rest of a binary message into the connection's reusable buffer.
func (c *conn) readBinary(r io.Reader) ([]byte, error) {
	buf := c.rl.rbuf[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	c.rl.rbuf = buf
	return buf, nil
}

// relayData handles a binary message from the client: datagrams to forward.
func (c *conn) relayData(msg []byte) {
	s := c.s
	cfg := &s.cfg.Relay
	if len(msg) == 0 {
		s.rl.badFrames.Add(1)
		c.reject(0, errorf(CodeMalformed, "relay frame: empty binary message"))
		return
	}
	now := s.clock.Now()
	flood := cfg.floodLimit()
	for len(msg) > 0 {
		f, rest, perr := nextRelayFrame(msg)
		if perr != nil {
			s.rl.badFrames.Add(1)
			c.reject(0, perr)
			c.rl.mu.Lock()
			leg := c.rl.legs[f.Session]
			c.rl.mu.Unlock()
			if leg != nil {
				c.closeLeg(leg, CodeMalformed, perr.Message, true, true)
			}
			return // the rest of the message cannot be framed
		}
		msg = rest
		cost := float64(len(f.Payload) + RelayHeaderLen)
		rl := &c.rl
		rl.mu.Lock()
		leg := rl.legs[f.Session]
		if leg == nil {
			recent := rl.recentlyClosed(f.Session)
			rl.mu.Unlock()
			if recent {
				s.rl.queueDropped.Add(1) // in flight when the session closed
				continue
			}
			s.rl.badFrames.Add(1)
			c.send(c.frame(0, TypeRelayClosed, relayClosedBody{Session: f.Session, Code: CodeUnknownSession, Message: "relay session was never opened"}))
			c.reject(0, errorf(CodeUnknownSession, "relay frame for session %d, which was never opened", f.Session))
			continue
		}
		if leg.state != legActive {
			rl.mu.Unlock()
			s.rl.badFrames.Add(1)
			c.reject(0, errorf(CodeInvalid, "relay session %d is not ready", f.Session))
			continue
		}
		if now.Sub(leg.winAt) >= time.Second {
			leg.winAt, leg.winBytes = now, 0
		}
		leg.winBytes += cost
		flooding := flood > 0 && leg.winBytes > flood
		peer, peerSid, peerConn := leg.peer, leg.peerSid, leg.peerConn
		rl.mu.Unlock()
		if flooding {
			s.rl.floods.Add(1)
			s.nAbusive.Add(1)
			c.closeLeg(leg, CodeRelayFlood, "more than "+formatBytes(flood)+" offered within a second", true, true)
			continue
		}
		if !c.takeIn(cost, now) {
			s.rl.rateDropped.Add(1)
			continue
		}
		if peerConn != nil {
			if errors.Is(peerConn.relayEnqueue(peerSid, c.id, f.Session, f.Payload), errRelayGone) {
				c.closeLeg(leg, CodeRelayClosed, "the peer's end is gone", true, false)
			}
			continue
		}
		rec := appendDataRec(make([]byte, 0, 42+len(f.Payload)), peerSid, c.id, f.Session, f.Payload)
		if s.routeAsync(routeItem{to: peer, rec: rec, from: c, fromSid: f.Session}) {
			s.rl.forwarded.Add(1)
		}
	}
}

func formatBytes(n float64) string {
	b, _ := json.Marshal(int64(n))
	return string(b) + " bytes"
}

// takeIn spends cost from the client's sending bucket.
func (c *conn) takeIn(cost float64, now time.Time) bool {
	cfg := &c.s.cfg.Relay
	if cfg.Rate < 0 {
		return true
	}
	rl := &c.rl
	rl.inTok = min(float64(cfg.Burst), rl.inTok+now.Sub(rl.inAt).Seconds()*cfg.Rate)
	rl.inAt = now
	if rl.inTok < cost {
		return false
	}
	rl.inTok -= cost
	return true
}

// errRelayGone: the session a datagram is for does not exist (any more) at its
// receiver, so its sender's end should close.
var errRelayGone = errors.New(string(CodeRelayClosed))

// relayEnqueue queues a datagram from (from, fromSid) for the client's session toSid,
// or drops it when the client's bucket or queues are full.
func (c *conn) relayEnqueue(toSid uint32, from identity.NodeID, fromSid uint32, p []byte) error {
	s := c.s
	cfg := &s.cfg.Relay
	n := len(p) + RelayHeaderLen
	rl := &c.rl
	rl.mu.Lock()
	leg := rl.legs[toSid]
	switch {
	case rl.gone:
		rl.mu.Unlock()
		return errRelayGone
	case leg == nil || leg.peer != from || leg.peerSid != fromSid:
		recent := rl.recentlyClosed(toSid)
		rl.mu.Unlock()
		if recent {
			s.rl.queueDropped.Add(1)
			return nil
		}
		return errRelayGone
	case leg.state != legActive:
		rl.mu.Unlock()
		s.rl.queueDropped.Add(1)
		return nil
	}
	if cfg.Rate >= 0 {
		now := s.clock.Now()
		rl.outTok = min(float64(cfg.Burst), rl.outTok+now.Sub(rl.outAt).Seconds()*cfg.Rate)
		rl.outAt = now
		if rl.outTok < float64(n) {
			rl.mu.Unlock()
			s.rl.rateDropped.Add(1)
			return nil
		}
		rl.outTok -= float64(n)
	}
	if leg.queued+n > cfg.SessionQueue || rl.qBytes+n > cfg.NodeQueue {
		rl.mu.Unlock()
		s.rl.queueDropped.Add(1)
		return nil
	}
	rl.q = append(rl.q, relayItem{leg: leg, p: append([]byte(nil), p...)})
	leg.queued += n
	rl.qBytes += n
	rl.mu.Unlock()
	s.rl.addQueued(n)
	s.rl.forwarded.Add(1)
	select {
	case rl.wake <- struct{}{}:
	default:
	}
	return nil
}

// flushRelay writes the queued datagrams, packed into binary messages of at most
// MaxFrame bytes. Their bytes stay counted against the queue until written, so the
// queue limit bounds what the writer holds too. It reports whether the writes worked.
func (c *conn) flushRelay() bool {
	rl := &c.rl
	rl.mu.Lock()
	items := rl.q
	rl.q, rl.spare = rl.spare, nil
	rl.mu.Unlock()
	if len(items) == 0 {
		return true
	}
	limit := c.s.cfg.MaxFrame
	buf := rl.wbuf[:0]
	ok := true
	var frames, bytes uint64
	for _, it := range items {
		if !ok || it.leg.dead.Load() {
			continue
		}
		if len(buf) > 0 && len(buf)+RelayHeaderLen+len(it.p) > limit {
			ok = c.writeBinary(buf)
			buf = buf[:0]
		}
		buf = AppendRelayFrame(buf, it.leg.sid, it.p)
		frames++
		bytes += uint64(len(it.p))
	}
	if ok && len(buf) > 0 {
		ok = c.writeBinary(buf)
	}
	rl.wbuf = buf[:0]
	if ok {
		c.s.rl.delivered.Add(frames)
		c.s.rl.deliveredB.Add(bytes)
	}
	released := 0
	rl.mu.Lock()
	for _, it := range items {
		n := len(it.p) + RelayHeaderLen
		it.leg.queued -= n
		released += n
	}
	if !rl.gone {
		// After gone, closeAllLegs has released the whole queue.
		rl.qBytes -= released
	} else {
		released = 0
	}
	clear(items)
	if rl.spare == nil {
		rl.spare = items[:0]
	}
	rl.mu.Unlock()
	c.s.rl.addQueued(-released)
	return ok
}

func (c *conn) writeBinary(b []byte) bool {
	c.raw.extendWriteDeadline(c.s.cfg.WriteTimeout)
	if err := c.ws.Write(context.Background(), websocket.MessageBinary, b); err != nil {
		c.s.log.Debug("relay write failed", "remote", c.remote, "node", c.id.Short(), "err", err)
		c.ws.CloseNow()
		return false
	}
	return true
}

// relayHandle takes an inter-server relay frame routed to this connection's node.
func (c *conn) relayHandle(f []byte) error {
	b := f[1:]
	type sender struct {
		node identity.NodeID
		sid  uint32
	}
	var gone map[sender]uint32
	for len(b) > 0 {
		r, rest, err := nextRecord(b)
		if err != nil {
			c.s.log.Warn("bad relay frame from another server", "node", c.id.Short(), "err", err)
			return errors.New(string(CodeMalformed))
		}
		b = rest
		switch r.kind {
		case recOpen:
			if e := c.relayIncoming(r.from, r.fromSid, r.tag, nil); e != nil {
				return errors.New(string(e.Code))
			}
		case recReady:
			if e := c.relayReadyIn(r.toSid, r.from, r.fromSid, nil); e != nil {
				return errors.New(string(e.Code))
			}
		case recClose:
			c.relayCloseIn(r.toSid, r.from, r.fromSid, r.code, r.msg)
		case recData:
			if errors.Is(c.relayEnqueue(r.toSid, r.from, r.fromSid, r.payload), errRelayGone) {
				if gone == nil {
					gone = make(map[sender]uint32)
				}
				gone[sender{r.from, r.fromSid}] = r.toSid
			}
		}
	}
	for snd, sid := range gone {
		c.s.routeAsync(routeItem{to: snd.node, rec: appendCloseRec(nil, snd.sid, c.id, sid, CodeRelayClosed, "the peer's end is gone")})
	}
	return nil
}

// routeSync sends one inter-server frame to node and maps the answer to a wire error.
func (s *Server) routeSync(node identity.NodeID, frame []byte) *Error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StoreTimeout)
	err := s.store.Route(ctx, node.String(), frame)
	cancel()
	var re *store.RejectedError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, store.ErrNoRoute):
		return errorf(CodePeerOffline, "%s is not connected", node.Short())
	case errors.As(err, &re):
		return errorf(Code(re.Reason), "%s's server refused", node.Short())
	default:
		s.log.Warn("relay routing failed", "node", node.Short(), "err", err)
		return errorf(CodeInternal, "routing failed")
	}
}

// The router carries records to nodes on other servers without waiting on the sender:
// one worker per shard, a node's records always in the same shard so they stay in
// order, and the records queued for one node sent together as one store frame.
const (
	routeShards   = 4
	routeMaxFrame = 64 << 10
)

type routeItem struct {
	to      identity.NodeID
	rec     []byte
	from    *conn // the sending connection of a datagram, told if the peer is gone
	fromSid uint32
}

type routeShard struct {
	mu      sync.Mutex
	items   []routeItem
	spare   []routeItem
	bytes   int
	limit   int
	stopped bool
	wake    chan struct{}
}

type relayRouter struct {
	s      *Server
	shards [routeShards]*routeShard
	done   chan struct{}
	wg     sync.WaitGroup
}

// routeAsync queues a record for a node on another server, reporting whether it fit.
func (s *Server) routeAsync(it routeItem) bool {
	s.rl.mu.Lock()
	r := s.rl.router
	if r == nil && !s.rl.stopped {
		r = &relayRouter{s: s, done: make(chan struct{})}
		for i := range r.shards {
			sh := &routeShard{limit: s.cfg.Relay.RouteQueue / routeShards, wake: make(chan struct{}, 1)}
			r.shards[i] = sh
			r.wg.Go(func() { r.run(sh) })
		}
		s.rl.router = r
	}
	s.rl.mu.Unlock()
	if r == nil {
		return false
	}
	sh := r.shards[int(it.to[0])%routeShards]
	sh.mu.Lock()
	if sh.stopped || sh.bytes+len(it.rec) > sh.limit {
		sh.mu.Unlock()
		s.rl.queueDropped.Add(1)
		return false
	}
	sh.items = append(sh.items, it)
	sh.bytes += len(it.rec)
	sh.mu.Unlock()
	s.rl.addQueued(len(it.rec))
	select {
	case sh.wake <- struct{}{}:
	default:
	}
	return true
}

// stopRelayRouter ends the router's workers; records still queued are dropped.
func (s *Server) stopRelayRouter() {
	s.rl.mu.Lock()
	r := s.rl.router
	s.rl.router, s.rl.stopped = nil, true
	s.rl.mu.Unlock()
	if r == nil {
		return
	}
	close(r.done)
	r.wg.Wait()
	for _, sh := range r.shards {
		sh.mu.Lock()
		sh.stopped = true
		s.rl.addQueued(-sh.bytes)
		sh.items, sh.bytes = nil, 0
		sh.mu.Unlock()
	}
}

func (r *relayRouter) run(sh *routeShard) {
	for {
		select {
		case <-r.done:
			return
		case <-sh.wake:
		}
		sh.mu.Lock()
		items := sh.items
		sh.items, sh.spare = sh.spare, nil
		sh.mu.Unlock()
		released := r.send(items)
		sh.mu.Lock()
		sh.bytes -= released
		clear(items)
		if sh.spare == nil {
			sh.spare = items[:0]
		}
		sh.mu.Unlock()
		r.s.rl.addQueued(-released)
	}
}

type routeBatch struct {
	frame   []byte
	senders map[*conn]map[uint32]bool
}

// send groups items by node and routes each node's records as one frame, returning the
// bytes taken from the queue.
func (r *relayRouter) send(items []routeItem) int {
	released := 0
	batches := make(map[identity.NodeID]*routeBatch)
	var order []identity.NodeID
	for _, it := range items {
		released += len(it.rec)
		b := batches[it.to]
		if b != nil && len(b.frame)+len(it.rec) > routeMaxFrame {
			r.route(it.to, b)
			b.frame, b.senders = b.frame[:1], nil
		}
		if b == nil {
			b = &routeBatch{frame: append(make([]byte, 0, 4<<10), relayInternal)}
			batches[it.to] = b
			order = append(order, it.to)
		}
		b.frame = append(b.frame, it.rec...)
		if it.from != nil {
			if b.senders == nil {
				b.senders = make(map[*conn]map[uint32]bool)
			}
			if b.senders[it.from] == nil {
				b.senders[it.from] = make(map[uint32]bool)
			}
			b.senders[it.from][it.fromSid] = true
		}
	}
	for _, node := range order {
		if b := batches[node]; len(b.frame) > 1 {
			r.route(node, b)
		}
	}
	return released
}

func (r *relayRouter) route(node identity.NodeID, b *routeBatch) {
	s := r.s
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StoreTimeout)
	err := s.store.Route(ctx, node.String(), b.frame)
	cancel()
	if err == nil {
		return
	}
	s.log.Debug("relay route failed", "node", node.Short(), "err", err)
	if !errors.Is(err, store.ErrNoRoute) {
		return // a timeout or a busy server: the datagrams are lost, QUIC resends
	}
	for c, sids := range b.senders {
		for sid := range sids {
			c.rl.mu.Lock()
			leg := c.rl.legs[sid]
			c.rl.mu.Unlock()
			if leg != nil {
				c.closeLeg(leg, CodeRelayClosed, "the peer is no longer connected", true, false)
			}
		}
	}
}
