package connect

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/identity"
	"peerlink/mux"
	"peerlink/nat"
	"peerlink/punch"
	"peerlink/relay"
	"peerlink/signal"
)

// Frames on the data path: a marker byte that no STUN message starts with, the
// receiver's connection ID (so packets find their connection whatever path or address
// they come from), a kind, and the payload.
const (
	frameMarker = 0xC7
	frameHeader = 10

	kindData = 0
	kindPing = 1
	kindPong = 2
	// LAN handshake (lan.go): hello and its answer travel with connection ID zero; bye
	// ends a LAN connection, which has no signaling to say it with.
	kindHello    = 3
	kindHelloAck = 4
	kindBye      = 5
)

func appendFrame(b []byte, id uint64, kind byte, payload []byte) []byte {
	b = append(b, frameMarker)
	b = binary.BigEndian.AppendUint64(b, id)
	b = append(b, kind)
	return append(b, payload...)
}

func parseFrame(b []byte) (id uint64, kind byte, payload []byte, ok bool) {
	if len(b) < frameHeader || b[0] != frameMarker {
		return 0, 0, nil, false
	}
	return binary.BigEndian.Uint64(b[1:9]), b[9], b[frameHeader:], true
}

// inQueue is how many received datagrams wait for Recv before more are dropped: enough
// for a burst at full speed (a QUIC congestion window's worth) while the reader is
// descheduled.
const inQueue = 4096

// ErrNoPath is returned by Send before the connection has a path.
var ErrNoPath = errors.New("connect: no path yet")

// Stats are a connection's timings.
type Stats struct {
	// FirstPath is the time from the start to the first working path (relayed or
	// direct); ToDirect to the direct path, zero if there is none.
	FirstPath, ToDirect time.Duration
	// Fallbacks counts moves from a silent direct path to the relay; Restores moves
	// back once the direct path answered again (see PathCheck).
	Fallbacks, Restores int
	// Received counts datagrams that arrived for Recv; Dropped those of them lost
	// because Recv's queue was full.
	Received, Dropped uint64
}

// Conn is a connection to a peer. It carries datagrams over its current path.
type Conn struct {
	n         *Node
	peer      identity.NodeID
	session   string
	initiator bool
	opts      Options
	checkKey  []byte
	recvID    uint64
	sendID    uint64
	started   time.Time

	msgs      chan *signal.Message
	in        chan []byte
	ready     chan struct{}
	readyOnce sync.Once
	done      chan struct{}
	doneOnce  sync.Once
	err       error

	mu           sync.Mutex
	method       Method
	technique    nat.Technique
	settled      bool // the direct path was found, or given up
	direct       *mux.Mux
	directAddr   netip.AddrPort
	extra        *mux.Mux // a socket punching opened for this connection
	relayPeer    netip.AddrPort
	relayUp      bool
	relayWatched bool // watchRelay runs
	// ipv6 are the pings toward the peer's IPv6 candidates (ipv6.go); nil when none run.
	ipv6 *ipv6Checks
	// wsr is the path through the rendezvous server (the last resort), once open;
	// wsrReady is closed then.
	wsr      *signal.RelayConn
	wsrReady chan struct{}
	wsrOnce  sync.Once
	stats    Stats
	// peerInfo is what the peer's signed offer or answer said; zero on LAN connections.
	peerInfo signal.ConnectionInfo

	// Direct path health (watchDirect).
	directDown   bool   // the direct path went silent: Send uses the relay
	directMethod Method // how the direct path was made, for moving back to it
	lastPong     time.Time
	pongs        int

	received, dropped atomic.Uint64

	// retrySoon makes a connection that fell back to the relay retry its direct path
	// at once (the network changed); relayHeard is when a frame last came through the
	// relay (UnixNano), for watchRelay.
	retrySoon  atomic.Bool
	relayHeard atomic.Int64

	// lan is set on connections made by the LAN handshake; acks are its answers, for
	// the initiator.
	lan  bool
	acks chan lanAnswer
}

func newConn(n *Node, peer identity.NodeID, session string, initiator bool, opts Options, key []byte) *Conn {
	idA, idB := binary.BigEndian.Uint64(key[32:40]), binary.BigEndian.Uint64(key[40:48])
	c := &Conn{
		n: n, peer: peer, session: session, initiator: initiator, opts: opts, checkKey: key[:32],
		started: n.clock.Now(),
		msgs:    make(chan *signal.Message, 16),
		in:      make(chan []byte, inQueue),
		ready:   make(chan struct{}),
		done:    make(chan struct{}),

		wsrReady: make(chan struct{}),
	}
	c.recvID, c.sendID = idA, idB
	if !initiator {
		c.recvID, c.sendID = idB, idA
	}
	return c
}

// Peer is the NodeID at the other end.
func (c *Conn) Peer() identity.NodeID { return c.peer }

// Initiator is true on the side that called Connect, false on the side that accepted.
// Protocols above that need a client and a server pick them by it.
func (c *Conn) Initiator() bool { return c.initiator }

// LocalProfile is the NAT profile of this end's node (its binding lifetime, when
// measured, tells how often an idle connection must send to keep its mapping).
func (c *Conn) LocalProfile() nat.Profile { return c.n.Profile() }

// Method says how the current path was made: direct, punched or relayed.
func (c *Conn) Method() Method {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.method
}

// Technique is the plan's technique for the direct path (nat.Relay when none was
// possible).
func (c *Conn) Technique() nat.Technique {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.technique
}

// Stats returns the connection's timings.
func (c *Conn) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Received, s.Dropped = c.received.Load(), c.dropped.Load()
	return s
}

// Send sends one datagram to the peer over the current path.
func (c *Conn) Send(b []byte) error {
	select {
	case <-c.done:
		return ErrClosed
	default:
	}
	frame := appendFrame(make([]byte, 0, frameHeader+len(b)), c.sendID, kindData, b)
	c.mu.Lock()
	direct, addr, relayUp, relayPeer, wsr := c.direct, c.directAddr, c.relayUp, c.relayPeer, c.wsr
	if c.directDown {
		direct = nil
	}
	c.mu.Unlock()
	switch {
	case direct != nil:
		return direct.WriteTo(frame, addr)
	case relayUp:
		if rc := c.n.relayConn(); rc != nil {
			_, err := rc.WriteTo(frame, net.UDPAddrFromAddrPort(relayPeer))
			return err
		}
	}
	if wsr != nil {
		_, err := wsr.WriteTo(frame, nil)
		return err
	}
	return ErrNoPath
}

// SendBatch sends datagrams to the peer over the current path, as Send sends each,
// but on a direct path in as few system calls as the socket allows (on Linux, one
// segmented send for a run of equal-sized datagrams). Bulk senders such as a
// WireGuard device use it.
func (c *Conn) SendBatch(bufs [][]byte) error {
	c.mu.Lock()
	direct, addr := c.direct, c.directAddr
	if c.directDown {
		direct = nil
	}
	c.mu.Unlock()
	if direct == nil || len(bufs) < 2 {
		for _, b := range bufs {
			if err := c.Send(b); err != nil {
				return err
			}
		}
		return nil
	}
	select {
	case <-c.done:
		return ErrClosed
	default:
	}
	total := 0
	for _, b := range bufs {
		total += frameHeader + len(b)
	}
	// The frames lie back to back in one buffer, so the mux can hand runs of them to
	// the kernel without copying them again.
	bp := batchBufs.Get().(*[]byte)
	backing := (*bp)[:0]
	if cap(backing) < total {
		backing = make([]byte, 0, total)
	}
	frames := make([][]byte, len(bufs))
	for i, b := range bufs {
		start := len(backing)
		backing = appendFrame(backing, c.sendID, kindData, b)
		frames[i] = backing[start:len(backing):len(backing)]
	}
	err := direct.WriteBatch(frames, addr)
	*bp = backing
	batchBufs.Put(bp)
	return err
}

// batchBufs hold SendBatch's frames; WriteBatch is done with them when it returns.
var batchBufs = sync.Pool{New: func() any { b := make([]byte, 0, 128<<10); return &b }}

// Recv returns the next datagram from the peer. Once the connection is closed it
// returns the error, even when datagrams are still queued.
func (c *Conn) Recv(ctx context.Context) ([]byte, error) {
	select {
	case <-c.done:
		return nil, c.err
	default:
	}
	select {
	case b := <-c.in:
		return b, nil
	case <-c.done:
		return nil, c.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close ends the connection and tells the peer.
func (c *Conn) Close() error {
	select {
	case <-c.done:
		return nil
	default:
	}
	if c.lan {
		c.sendLANBye()
	}
	if c.n.signal() != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c.n.signal().Send(ctx, &signal.Message{Type: signal.TypeBye, To: c.peer, Session: c.session, Bye: &signal.Bye{Reason: "closed"}})
		cancel()
	}
	c.closeWith(ErrClosed)
	return nil
}

func (c *Conn) closeWith(err error) {
	c.doneOnce.Do(func() {
		c.err = err
		close(c.done)
		c.mu.Lock()
		extra, wsr := c.extra, c.wsr
		c.mu.Unlock()
		if extra != nil {
			extra.Close()
		}
		if wsr != nil {
			wsr.Close()
		}
		c.n.forget(c)
	})
}

func (c *Conn) waitReady(ctx context.Context) (*Conn, error) {
	select {
	case <-c.ready:
		return c, nil
	case <-c.done:
		return nil, c.err
	case <-ctx.Done():
		err := fmt.Errorf("%w: no path to %s within the timeout: %w", ErrTimeout, c.peer.Short(), ctx.Err())
		c.closeWith(err)
		return nil, err
	}
}

func (c *Conn) deliver(m *signal.Message) {
	switch {
	case m.Type == signal.TypeBye:
		c.closeWith(fmt.Errorf("%w: peer said bye", ErrClosed))
		return
	case m.Type == signal.TypeCandidate && m.Candidate != nil:
		c.peerCandidate(*m.Candidate)
		return
	}
	select {
	case c.msgs <- m:
	default:
	}
}

// await waits for the peer's next message of type t in this session.
func (c *Conn) await(ctx context.Context, t signal.Type) (*signal.Message, error) {
	for {
		select {
		case m := <-c.msgs:
			if m.Type == t {
				return m, nil
			}
		case <-c.done:
			return nil, c.err
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: waiting for %s from %s: %w", ErrTimeout, t, c.peer.Short(), ctx.Err())
		}
	}
}

// pathUp records a working path and, the first time, releases waitReady.
func (c *Conn) pathUp(m Method) {
	c.mu.Lock()
	elapsed := c.n.clock.Now().Sub(c.started)
	if c.stats.FirstPath == 0 {
		c.stats.FirstPath = elapsed
	}
	switch {
	case !m.Relayed():
		c.stats.ToDirect = elapsed
		c.method = m
	case c.method == MethodNone, m == MethodRelayed && c.method == MethodRelayedHTTPS:
		c.method = m // a TURN relay beats the rendezvous server's
	}
	c.mu.Unlock()
	c.readyOnce.Do(func() { close(c.ready) })
}

// run is the initiator's side after the offer went out.
func (c *Conn) run(local signal.ConnectionInfo) {
	ctx, cancel := context.WithTimeout(c.n.ctx, c.opts.timeout())
	defer cancel()
	ans, err := c.await(ctx, signal.TypeAnswer)
	if err != nil {
		c.closeWith(err)
		return
	}
	c.proceed(ctx, local, *ans.Info)
}

// respond is the responder's side: answer the offer, then the same as the initiator.
func (c *Conn) respond(offer *signal.Message) {
	ctx, cancel := context.WithTimeout(c.n.ctx, c.opts.timeout())
	defer cancel()
	if c.n.cfg.Relay != nil {
		c.n.ensureRelay(ctx)
	}
	info := c.n.info()
	if err := c.n.signal().Send(ctx, &signal.Message{Type: signal.TypeAnswer, To: c.peer, Session: c.session, Info: &info}); err != nil {
		c.closeWith(err)
		return
	}
	go func() {
		select {
		case <-c.ready:
			select {
			case c.n.accept <- c:
			case <-c.done:
			case <-c.n.ctx.Done():
			}
		case <-c.done:
		}
	}()
	c.proceed(ctx, *offer.Info, info)
}

// PeerInfo returns the connection information the peer signed in its offer or answer
// (its candidates, NAT profile and, when it runs one, its WireGuard public key). It is
// the zero value for connections made over the LAN without signaling, and before the
// peer's offer or answer arrived.
func (c *Conn) PeerInfo() signal.ConnectionInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerInfo
}

// proceed runs the plan once both sides' information is known: the relay at once
// when allowed, and hole punching toward a direct path.
func (c *Conn) proceed(ctx context.Context, initiator, responder signal.ConnectionInfo) {
	c.mu.Lock()
	if c.initiator {
		c.peerInfo = responder
	} else {
		c.peerInfo = initiator
	}
	c.mu.Unlock()
	a, b := profileOf(initiator), profileOf(responder)
	plan := nat.Strategy(a, b)
	step := plan.Primary()
	if step.Technique == nat.Relay && plan[0].Technique == nat.Local {
		// Behind one public IP: their LAN addresses may reach each other even when
		// their NAT cannot be punched.
		step = plan[0]
	}
	self, local, remote, remoteInfo := nat.SideA, a, b, responder
	if !c.initiator {
		self, local, remote, remoteInfo = nat.SideB, b, a, initiator
	}
	srflx := c.n.reflexive()
	local.PublicIP, local.PublicPort = srflx.Addr(), srflx.Port()
	c.mu.Lock()
	c.technique = step.Technique
	c.mu.Unlock()
	c.n.log.Debug("connect: plan", "peer", c.peer.Short(), "plan", plan.String())

	var hosts, reflexive []netip.AddrPort
	var remoteRelayed netip.AddrPort
	for _, cand := range remoteInfo.Candidates {
		switch cand.Type {
		case signal.CandidateHost:
			hosts = append(hosts, cand.AddrPort())
		case signal.CandidateSrflx, signal.CandidatePrflx:
			reflexive = append(reflexive, cand.AddrPort())
		case signal.CandidateRelayed:
			remoteRelayed = cand.AddrPort()
		}
	}
	hosts, v6 := c.startIPv6(hosts, step.Technique) // IPv6 checks run beside the IPv4 plan (ipv6.go)
	relayed := !c.opts.NoRelay && remoteRelayed.IsValid() && c.n.relayConn() != nil
	if relayed {
		// Not ctx: that ends when this returns, and the relayed path must still be
		// confirmed when the first pings are lost.
		pctx, cancel := context.WithTimeout(c.n.ctx, c.opts.timeout())
		c.n.wg.Go(func() {
			defer cancel()
			c.relayPing(pctx, remoteRelayed)
		})
	}

	var punchErr error
	switch {
	case step.Technique == nat.Relay:
		punchErr = ErrSymmetricNAT
	case c.opts.NoDirect && !c.opts.NoRelay:
		punchErr = errors.New("direct paths disabled")
	default:
		punchErr = c.punch(ctx, punch.Setup{Session: c.session, Key: c.checkKey, Step: step, Self: self, Local: local, Remote: remote, Main: c.n.main}, hosts, reflexive)
	}
	if punchErr != nil {
		punchErr = v6.settle(c, punchErr, c.opts.NoRelay)
	}
	c.mu.Lock()
	c.settled = true
	c.mu.Unlock()
	if punchErr == nil {
		return
	}
	c.n.log.Debug("connect: no direct path", "peer", c.peer.Short(), "err", punchErr)
	switch {
	case relayed:
		// The relay carries the connection, or will within the timeout; should it not
		// answer soon, the rendezvous server relays meanwhile.
		c.n.wg.Go(c.httpsFallback)
		return
	case !c.opts.NoRelay && c.httpsRelay(ctx) == nil:
		return
	case c.opts.NoRelay && errors.Is(punchErr, ErrSymmetricNAT):
		c.closeWith(fmt.Errorf("connect: %s: %w", c.peer.Short(), ErrSymmetricNAT))
	case c.opts.NoRelay:
		c.closeWith(fmt.Errorf("connect: %s and relay is disabled: %w", c.peer.Short(), punchErr))
	default:
		why := c.n.relayError()
		if why == nil && !remoteRelayed.IsValid() {
			why = fmt.Errorf("%w: the peer has no relayed address", ErrNoRelay)
		}
		if why == nil {
			why = ErrNoRelay
		}
		c.closeWith(fmt.Errorf("connect: no direct path to %s (%v) and no relay: %w", c.peer.Short(), punchErr, why))
	}
}

// punch prepares an attempt, swaps predictions with the peer and runs it.
func (c *Conn) punch(ctx context.Context, setup punch.Setup, hosts, reflexive []netip.AddrPort) error {
	att, pred, err := c.n.engine.Prepare(ctx, setup)
	if err != nil {
		return err
	}
	defer att.Close()
	msg := &signal.Punch{Technique: setup.Step.Technique, StartAt: c.n.clock.Now(), Sockets: pred.Sockets}
	if pred.IP.IsValid() {
		for _, p := range pred.Ports {
			msg.Addresses = append(msg.Addresses, netip.AddrPortFrom(pred.IP, p))
		}
		if len(pred.Ports) == 0 {
			// Birthday probing names only the IP; port 1 stands for "any".
			msg.Addresses = []netip.AddrPort{netip.AddrPortFrom(pred.IP, 1)}
		}
	}
	if err := c.n.signal().Send(ctx, &signal.Message{Type: signal.TypePunch, To: c.peer, Session: c.session, Punch: msg}); err != nil {
		return err
	}
	theirs, err := c.await(ctx, signal.TypePunch)
	if err != nil {
		return err
	}
	var rp punch.Prediction
	if len(theirs.Punch.Addresses) > 0 {
		rp.IP = theirs.Punch.Addresses[0].Addr()
		rp.Sockets = theirs.Punch.Sockets
		if rp.Sockets == 0 {
			for _, a := range theirs.Punch.Addresses {
				rp.Ports = append(rp.Ports, a.Port())
			}
		}
	}
	res, err := att.Run(ctx, punch.Params{RemoteHost: hosts, RemoteReflexive: reflexive, RemotePrediction: rp, MaxAttempts: c.opts.attempts()})
	if err != nil {
		return err
	}
	c.mu.Lock()
	if c.direct != nil {
		// The IPv6 checks found a path first (ipv6.go): keep it.
		c.mu.Unlock()
		c.n.log.Debug("connect: IPv4 path found after the IPv6 one; keeping IPv6", "peer", c.peer.Short(), "technique", res.Technique)
		if res.Local != c.n.main {
			res.Local.Close()
		}
		return nil
	}
	c.direct, c.directAddr = res.Local, res.Remote
	c.directMethod = methodOf(res.Technique)
	if res.Local != c.n.main {
		c.extra = res.Local
	}
	c.mu.Unlock()
	if res.Local != c.n.main {
		c.n.wg.Go(func() { c.n.dataLoop(res.Local.Data(), nil) })
	}
	select {
	case <-c.done:
		res.Local.Close()
		return ErrClosed
	default:
	}
	c.pathUp(methodOf(res.Technique))
	if !c.n.cfg.PathCheck.Disabled {
		c.n.wg.Go(c.watchDirect)
	}
	return nil
}

// relayPing confirms the relayed path: pings through this node's allocation to the
// peer's relayed address until a pong comes back. Both peers ping, which also installs
// the permissions each allocation needs for the other.
func (c *Conn) relayPing(ctx context.Context, peer netip.AddrPort) {
	rc := c.n.relayConn()
	if rc == nil {
		return
	}
	c.mu.Lock()
	if !c.relayPeer.IsValid() {
		c.relayPeer = peer
	}
	c.mu.Unlock()
	ping := appendFrame(nil, c.sendID, kindPing, nil)
	to := net.UDPAddrFromAddrPort(peer)
	// Pings unanswered for a while may mean this node's allocation is gone (the relay
	// restarted while the node was idle): have it checked once, so that it is made
	// again and this connection still comes up within its timeout (relayMoved).
	checkAt := c.n.clock.Now().Add(c.n.cfg.PathCheck.timeout())
	for sent := 0; ; sent++ {
		c.mu.Lock()
		up := c.relayUp
		c.mu.Unlock()
		if up {
			c.n.log.Debug("connect: relayed path confirmed", "peer", c.peer.Short(), "pings", sent)
			return
		}
		if _, err := rc.WriteTo(ping, to); err != nil {
			c.n.log.Debug("connect: relay ping", "peer", c.peer.Short(), "to", peer, "err", err)
		}
		if !checkAt.IsZero() && c.n.clock.Now().After(checkAt) {
			checkAt = time.Time{}
			c.n.checkRelaySoon()
		}
		// Quick at first, for a fast start; then easier on a relay that is slow to let
		// the first datagrams through.
		interval := 50 * time.Millisecond
		if sent >= 20 {
			interval = 250 * time.Millisecond
		}
		select {
		case <-time.After(interval):
		case <-ctx.Done():
			c.n.log.Debug("connect: relay pings unanswered", "peer", c.peer.Short(), "pings", sent, "err", ctx.Err())
			return
		case <-c.done:
			return
		}
	}
}

// receive handles one frame for this connection that arrived on pc (via the relay
// when via is set) from from.
func (c *Conn) receive(kind byte, payload []byte, from netip.AddrPort, pc net.PacketConn, via *relay.Conn) {
	if via != nil {
		c.relayHeard.Store(c.n.clock.Now().UnixNano())
	}
	switch kind {
	case kindData:
		c.deliverData(payload)
	case kindPing:
		pong := appendFrame(nil, c.sendID, kindPong, nil)
		pc.WriteTo(pong, net.UDPAddrFromAddrPort(from))
		if via != nil {
			c.relayConfirmed(from)
		} else if c.movedFrom(from, pc) {
			// The peer's pings come from a new address: ping back, and its pong
			// moves the direct path there (roam).
			pc.WriteTo(appendFrame(nil, c.sendID, kindPing, nil), net.UDPAddrFromAddrPort(from))
		}
	case kindPong:
		if via != nil {
			c.relayConfirmed(from)
		} else {
			c.ipv6Pong(from, pc)
			c.roam(from, pc)
			c.directPong()
		}
	case kindBye:
		if c.lan {
			c.closeWith(fmt.Errorf("%w: peer said bye", ErrClosed))
		}
	}
}

// movedFrom reports whether a frame on the direct socket came from another address
// than the direct path's.
func (c *Conn) movedFrom(from netip.AddrPort, pc net.PacketConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.direct != nil && c.settled && from != c.directAddr && c.direct.Data() == pc
}

// relayConfirmed marks the relayed path working: a ping or pong came through it.
func (c *Conn) relayConfirmed(from netip.AddrPort) {
	c.relayHeard.Store(c.n.clock.Now().UnixNano())
	c.mu.Lock()
	first := !c.relayUp
	watch := first && !c.relayWatched
	c.relayUp, c.relayPeer = true, from
	if watch {
		c.relayWatched = true
	}
	c.mu.Unlock()
	if first {
		c.n.log.Debug("connect: relayed path up", "peer", c.peer.Short(), "from", from)
		c.pathUp(MethodRelayed)
	}
	if watch && !c.n.cfg.PathCheck.Disabled {
		c.n.wg.Go(c.watchRelay)
	}
}

func (n *Node) relayConn() *relay.Conn {
	n.relayMu.Lock()
	defer n.relayMu.Unlock()
	return n.relay
}

func (n *Node) relayError() error {
	n.relayMu.Lock()
	defer n.relayMu.Unlock()
	if n.cfg.Relay == nil {
		return fmt.Errorf("%w: no relay configured", ErrNoRelay)
	}
	return n.relayErr
}

// profileOf is the NAT profile a peer published, reflexive address included.
func profileOf(ci signal.ConnectionInfo) nat.Profile {
	var p nat.Profile
	if ci.Profile != nil {
		p = *ci.Profile
	}
	if ci.PublicIP.IsValid() {
		p.PublicIP, p.PublicPort = ci.PublicIP, ci.PublicPort
	}
	return p
}
