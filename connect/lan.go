package connect

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"peerlink/identity"
	"peerlink/mdns"
	"peerlink/nat"
)

// LANConfig turns on LAN discovery: the node advertises its main socket over mDNS
// (service mdns.ServiceType), and Connect looks for the target on the link before it
// asks the rendezvous server, and connects to it directly when found. mDNS says nothing
// trustworthy, so the first packets both ways (a hello and its answer) prove each
// side's NodeID with a key only the two nodes can derive.
//
// The zero value advertises and browses on every multicast interface.
type LANConfig struct {
	// MDNS configures the advertiser and the browser.
	MDNS mdns.Config
	// Do runs fn where the mDNS sockets must be opened (inside a network namespace, for
	// instance); nil means in the calling goroutine.
	Do func(fn func() error) error
	// Lookup, when set, replaces mDNS: it returns the addresses where id claims to be on
	// the link (a static list of peers, or a test's emulated link), and nothing is
	// advertised. Claims are checked by the handshake all the same.
	Lookup func(ctx context.Context, id identity.NodeID) ([]netip.AddrPort, error)
	// Wait is how long Connect looks for the target on the link before it turns to the
	// rendezvous server; zero means 1 s. Without a rendezvous server Connect looks until
	// Options.Timeout.
	Wait time.Duration
	// Handshake is how long a peer found on the link has to answer the hello before
	// Connect turns to the rendezvous server; zero means 2 s. Without a rendezvous
	// server it has until Options.Timeout.
	Handshake time.Duration
}

func (c *LANConfig) wait() time.Duration {
	if c.Wait <= 0 {
		return time.Second
	}
	return c.Wait
}

func (c *LANConfig) handshake() time.Duration {
	if c.Handshake <= 0 {
		return 2 * time.Second
	}
	return c.Handshake
}

// ErrPeerMismatch: a node found on the LAN under the target's NodeID answered, but could
// not prove it holds that NodeID's key (a forged or stale mDNS record).
var ErrPeerMismatch = errors.New("connect: the peer on the LAN is not the node it claims to be")

// lanSkew is how far a hello's timestamp may be from this node's clock. Hellos outside
// it are dropped, and sessions seen within it are remembered, so that a recorded hello
// cannot be replayed to open a connection in the sender's name.
const lanSkew = 2 * time.Minute

// lanState is a node's LAN discovery: the mDNS advertiser and browser (or the
// configured Lookup) and the sessions of hellos already accepted.
type lanState struct {
	cfg    *LANConfig
	adv    *mdns.Advertiser
	br     *mdns.Browser
	lookup func(ctx context.Context, id identity.NodeID) ([]netip.AddrPort, error)

	mu   sync.Mutex
	seen map[string]time.Time
}

// lanAnswer is a hello's answer as the initiator received it.
type lanAnswer struct {
	from     netip.AddrPort
	peer     identity.NodeID // who the answer says it is from
	verified bool            // its MAC is good: peer really answered
}

// startLAN starts advertising the main socket and browsing, unless a Lookup replaces
// mDNS.
func (n *Node) startLAN(ctx context.Context) error {
	lc := n.cfg.LAN
	st := &lanState{cfg: lc, seen: map[string]time.Time{}, lookup: lc.Lookup}
	if st.lookup == nil {
		do := lc.Do
		if do == nil {
			do = func(fn func() error) error { return fn() }
		}
		svc := mdns.Service{NodeID: n.id.NodeID(), Port: n.main.LocalAddr().Port()}
		if n.cfg.Profile != nil || len(n.cfg.STUN) > 0 {
			svc.Profile = n.Profile().String()
		}
		err := do(func() error {
			var err error
			if st.adv, err = mdns.Advertise(ctx, lc.MDNS, svc); err != nil {
				return err
			}
			if st.br, err = mdns.Browse(ctx, lc.MDNS); err != nil {
				st.adv.Close()
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("connect: LAN discovery: %w", err)
		}
		st.lookup = func(ctx context.Context, id identity.NodeID) ([]netip.AddrPort, error) {
			p, err := st.br.Lookup(ctx, id)
			if err != nil {
				return nil, err
			}
			return p.AddrPorts(), nil
		}
	}
	n.lan = st
	return nil
}

func (st *lanState) close() {
	if st.adv != nil {
		st.adv.Close()
	}
	if st.br != nil {
		st.br.Close()
	}
}

// connectLAN looks target up on the link and, when it is there, sends hellos from the
// main socket to its addresses until one answers with proof of target's key.
func (n *Node) connectLAN(ctx context.Context, target identity.NodeID, opts Options) (*Conn, error) {
	lc := n.lan.cfg
	lctx, cancel := ctx, context.CancelFunc(func() {})
	if n.signal() != nil {
		lctx, cancel = context.WithTimeout(ctx, lc.wait())
	}
	found, err := n.lan.lookup(lctx, target)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("connect: %w: %s was not found on the LAN: %w", ErrPeerOffline, target.Short(), err)
	}
	var addrs []netip.AddrPort
	for _, a := range found {
		// The main socket is IPv4.
		a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
		if a.Addr().Is4() && a.Port() != 0 && !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("connect: %w: %s is on the LAN without an IPv4 address (%v)", ErrPeerOffline, target.Short(), found)
	}
	session := newSession()
	key, err := n.lanKey(target, session)
	if err != nil {
		return nil, fmt.Errorf("connect: %s: %w", target.Short(), err)
	}
	c, err := n.newConnWith(target, session, true, opts, func(c *Conn) {
		c.lan, c.acks = true, make(chan lanAnswer, 16)
	})
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.technique = nat.Local
	c.mu.Unlock()
	hello := appendFrame(nil, 0, kindHello, lanMessage{session: session, from: n.id.NodeID(), to: target, at: n.clock.Now()}.seal(key, kindHello))
	hctx := ctx
	if n.signal() != nil {
		var cancel context.CancelFunc
		hctx, cancel = context.WithTimeout(ctx, lc.handshake())
		defer cancel()
	}
	n.log.Debug("connect: peer found on the LAN, saying hello", "peer", target.Short(), "addrs", addrs)
	wrong := map[netip.AddrPort]lanAnswer{}
	interval := 50 * time.Millisecond
	for {
		for _, a := range addrs {
			if err := n.main.WriteTo(hello, a); err != nil {
				n.log.Debug("connect: LAN hello", "to", a, "err", err)
			}
		}
		t := time.NewTimer(interval)
	wait:
		for {
			select {
			case ans := <-c.acks:
				if ans.verified && ans.peer == target {
					t.Stop()
					c.lanEstablished(ans.from)
					return c, nil
				}
				n.log.Debug("connect: a node on the LAN answered for another", "peer", target.Short(), "from", ans.from, "answered_as", ans.peer.Short(), "verified", ans.verified)
				wrong[ans.from] = ans
				if allWrong(addrs, wrong) {
					t.Stop()
					err := fmt.Errorf("%w: %s", ErrPeerMismatch, describeWrong(target, wrong))
					c.closeWith(err)
					return nil, err
				}
			case <-t.C:
				break wait
			case <-c.done:
				t.Stop()
				return nil, c.err
			case <-hctx.Done():
				t.Stop()
				err := fmt.Errorf("%w: %s was found on the LAN at %v but did not answer: %w", ErrTimeout, target.Short(), addrs, hctx.Err())
				if len(wrong) > 0 {
					err = fmt.Errorf("%w: %s", ErrPeerMismatch, describeWrong(target, wrong))
				}
				c.closeWith(err)
				return nil, err
			}
		}
		interval = min(interval*2, 500*time.Millisecond)
	}
}

// allWrong reports whether every address answered, provably, as another node: nothing
// more will come. Unverified answers do not count, since anyone on the link can send
// them with the right source address.
func allWrong(addrs []netip.AddrPort, wrong map[netip.AddrPort]lanAnswer) bool {
	for _, a := range addrs {
		if w, ok := wrong[a]; !ok || !w.verified {
			return false
		}
	}
	return true
}

func describeWrong(target identity.NodeID, wrong map[netip.AddrPort]lanAnswer) string {
	s := ""
	for from, w := range wrong {
		if s != "" {
			s += "; "
		}
		if w.verified {
			s += fmt.Sprintf("the node at %s advertised as %s is %s", from, target.Short(), w.peer.Short())
		} else {
			s += fmt.Sprintf("the node at %s answered as %s without proof of its key", from, target.Short())
		}
	}
	return s
}

// lanEstablished puts c on the direct path to addr through the main socket.
func (c *Conn) lanEstablished(addr netip.AddrPort) {
	c.mu.Lock()
	c.direct, c.directAddr, c.directMethod = c.n.main, addr, MethodDirect
	c.technique, c.settled = nat.Local, true
	c.mu.Unlock()
	c.n.log.Info("connect: connected over the LAN", "peer", c.peer.Short(), "addr", addr, "initiator", c.initiator)
	c.pathUp(MethodDirect)
	if !c.n.cfg.PathCheck.Disabled {
		c.n.wg.Go(c.watchDirect)
	}
}

// sendLANBye tells the peer of a LAN connection that it ended; twice, as UDP may lose
// one and nothing else will say it.
func (c *Conn) sendLANBye() {
	c.mu.Lock()
	direct, addr := c.direct, c.directAddr
	c.mu.Unlock()
	if direct == nil {
		return
	}
	bye := appendFrame(nil, c.sendID, kindBye, nil)
	direct.WriteTo(bye, addr)
	direct.WriteTo(bye, addr)
}

// lanFrame handles a LAN handshake frame (connection ID zero) that arrived on pc from
// from.
func (n *Node) lanFrame(kind byte, payload []byte, from netip.AddrPort, pc net.PacketConn) {
	m, err := parseLANMessage(payload)
	if err != nil {
		return
	}
	self := n.id.NodeID()
	switch kind {
	case kindHello:
		n.lanHello(m, payload, from, pc, self)
	case kindHelloAck:
		if m.to != self {
			return
		}
		n.mu.Lock()
		c := n.sessions[m.session]
		n.mu.Unlock()
		if c == nil || !c.lan || !c.initiator {
			return
		}
		ans := lanAnswer{from: from, peer: m.from}
		if key, err := n.lanKey(m.from, m.session); err == nil {
			ans.verified = m.verify(payload, key, kindHelloAck)
		}
		select {
		case c.acks <- ans:
		default:
		}
	}
}

func (n *Node) lanHello(m lanMessage, payload []byte, from netip.AddrPort, pc net.PacketConn, self identity.NodeID) {
	if m.from == self {
		return // our own hello, looped back
	}
	now := n.clock.Now()
	if d := now.Sub(m.at); d > lanSkew || d < -lanSkew {
		n.log.Debug("connect: LAN hello with a stale timestamp", "from", from, "skew", d)
		return
	}
	key, err := n.lanKey(m.from, m.session)
	if err != nil {
		return
	}
	ack := func() {
		a := lanMessage{session: m.session, from: self, to: m.from, at: now}
		pc.WriteTo(appendFrame(nil, 0, kindHelloAck, a.seal(key, kindHelloAck)), net.UDPAddrFromAddrPort(from))
	}
	if m.to != self {
		// Someone advertised our address under another NodeID, or the record is stale:
		// say, provably, who is here, so that the sender need not wait. (The hello is
		// sealed for the node it was meant for, so it cannot be checked here; the
		// answer is no bigger than the hello, so it amplifies nothing.)
		ack()
		return
	}
	if !m.verify(payload, key, kindHello) {
		n.log.Debug("connect: LAN hello without proof of its sender's key", "from", from, "claims", m.from.Short())
		return
	}
	n.mu.Lock()
	existing := n.sessions[m.session]
	n.mu.Unlock()
	if existing != nil {
		if existing.lan && !existing.initiator && existing.peer == m.from {
			ack() // a retransmitted hello: our answer was lost
		}
		return
	}
	if !n.lan.fresh(m.session, now) {
		n.log.Debug("connect: replayed LAN hello", "from", from, "claims", m.from.Short())
		return
	}
	c, err := n.newConnWith(m.from, m.session, false, Options{}, func(c *Conn) { c.lan = true })
	if err != nil {
		return
	}
	c.lanEstablished(from)
	ack()
	n.wg.Go(func() {
		select {
		case n.accept <- c:
		case <-c.done:
		case <-n.ctx.Done():
		}
	})
}

// fresh records session as seen and reports whether it was new; entries older than
// twice lanSkew can no longer come back with an acceptable timestamp and are dropped.
func (st *lanState) fresh(session string, now time.Time) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if _, ok := st.seen[session]; ok {
		return false
	}
	for s, at := range st.seen {
		if now.Sub(at) > 2*lanSkew {
			delete(st.seen, s)
		}
	}
	st.seen[session] = now
	return true
}

// lanKey is the key hellos and answers between this node and peer are sealed with:
// only the two of them can derive it, so a good MAC proves the sender's NodeID.
func (n *Node) lanKey(peer identity.NodeID, session string) ([]byte, error) {
	return n.id.SharedKey(peer, []byte("lan\n"+session), 32)
}

// lanMessage is a hello or its answer: version, session (32 hex digits), sender and
// addressee NodeIDs, the sender's time in Unix nanoseconds, and an HMAC-SHA256 over
// all of it (and the frame kind) keyed with lanKey.
type lanMessage struct {
	session  string
	from, to identity.NodeID
	at       time.Time
}

const (
	lanVersion    = 1
	lanSessionLen = 32
	lanBodyLen    = 1 + lanSessionLen + 32 + 32 + 8
	lanMessageLen = lanBodyLen + sha256.Size
)

var errLANMessage = errors.New("connect: malformed LAN handshake message")

func (m lanMessage) seal(key []byte, kind byte) []byte {
	b := make([]byte, 0, lanMessageLen)
	b = append(b, lanVersion)
	b = append(b, m.session...)
	b = append(b, m.from[:]...)
	b = append(b, m.to[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(m.at.UnixNano()))
	return append(b, lanMAC(key, kind, b)...)
}

func lanMAC(key []byte, kind byte, body []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte{kind})
	h.Write(body)
	return h.Sum(nil)
}

// verify checks raw's MAC (raw is the message m was parsed from).
func (m lanMessage) verify(raw, key []byte, kind byte) bool {
	return hmac.Equal(raw[lanBodyLen:lanMessageLen], lanMAC(key, kind, raw[:lanBodyLen]))
}

func parseLANMessage(b []byte) (lanMessage, error) {
	if len(b) != lanMessageLen {
		return lanMessage{}, fmt.Errorf("%w: %d bytes, want %d", errLANMessage, len(b), lanMessageLen)
	}
	if b[0] != lanVersion {
		return lanMessage{}, fmt.Errorf("%w: version %d", errLANMessage, b[0])
	}
	session := string(b[1 : 1+lanSessionLen])
	if _, err := hex.DecodeString(session); err != nil {
		return lanMessage{}, fmt.Errorf("%w: session is not hex", errLANMessage)
	}
	var m lanMessage
	m.session = session
	copy(m.from[:], b[1+lanSessionLen:])
	copy(m.to[:], b[1+lanSessionLen+32:])
	m.at = time.Unix(0, int64(binary.BigEndian.Uint64(b[1+lanSessionLen+64:])))
	return m, nil
}
