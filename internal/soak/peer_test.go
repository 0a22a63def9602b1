package soak

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/punch"
	"peerlink/session"
	"peerlink/signal"
)

// kinds are the NATs peers sit behind, in turn: the common home router, full and
// address-restricted cones, symmetric NATs (random and sequential ports), a port-
// randomising cone, a public host and a home router behind carrier-grade NAT.
var kinds = []string{"ei-pd-pp", "ei-ei-pp", "ei-hd-pp", "pd-pd-rd", "ei-pd-rd", "hd-hd-pc", "open", "cgnat"}

// peer is one machine: a host behind its NAT, running one node generation at a time.
// A restart closes the generation and starts a new one with a new identity.
type peer struct {
	idx  int
	name string
	kind string
	nat  *natlab.NAT // nil for an open host
	host *natlab.Host
	prof nat.Profile
	// manual leaves Accept to the test instead of serving transfers.
	manual bool

	mu  sync.Mutex
	cur *gen // nil while restarting or after shutdown
}

// gen is one node on a peer: its identity, rendezvous client, node, and the goroutines
// that serve what it accepts. close stops them all and waits.
type gen struct {
	p       *peer
	id      *identity.Identity
	sc      *signal.Client
	node    *connect.Node
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	closed  atomic.Bool
	rebound atomic.Bool // the NAT rebound under this generation
	once    sync.Once
}

func (g *gen) close() {
	g.once.Do(func() {
		g.closed.Store(true)
		g.cancel()
		g.node.Close()
		g.sc.Close()
		g.wg.Wait()
	})
}

// current returns the peer's running generation, or nil.
func (p *peer) current() *gen {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur
}

// addPeers puts n peers on the world's network, behind NATs of every kind in turn.
func addPeers(w *world, pr params) []*peer {
	link := natlab.Link{Latency: pr.latency, Jitter: pr.jitter, Loss: pr.loss}
	var cgn *natlab.NAT
	peers := make([]*peer, pr.peers)
	for i := range peers {
		p := &peer{idx: i, name: fmt.Sprintf("p%03d", i), kind: kinds[i%len(kinds)]}
		lan := netip.AddrFrom4([4]byte{10, byte(i / 250), byte(i%250 + 1), 2})
		switch p.kind {
		case "open":
			p.host = w.Net.AddPublicHost(p.name, netip.AddrFrom4([4]byte{203, 0, 114, byte(i/len(kinds) + 1)}))
			p.host.SetLink(link)
			p.prof = nat.Profile{Open: true, Mapping: nat.MappingEI, Filtering: nat.FilteringEI, Allocation: nat.AllocationPP}
		case "cgnat":
			if cgn == nil {
				cgn = w.Net.AddNAT(natlab.NATConfig{Name: "cgn", Type: mustType("ei-pd-pp"), PublicIP: netip.MustParseAddr("198.51.99.1"),
					MappingTimeout: pr.mappingTimeout, Uplink: link})
			}
			p.nat = w.Net.AddNAT(natlab.NATConfig{Name: p.name + "-nat", Type: mustType("ei-pd-pp"), Parent: cgn,
				PublicIP: netip.AddrFrom4([4]byte{100, 64, byte(i / 250), byte(i%250 + 1)}), MappingTimeout: pr.mappingTimeout})
			p.host = p.nat.AddHost(p.name, lan)
			p.prof = profileOf(mustType("ei-pd-pp"))
		default:
			t := mustType(p.kind)
			p.nat = w.Net.AddNAT(natlab.NATConfig{Name: p.name + "-nat", Type: t, PublicIP: natIP(i),
				MappingTimeout: pr.mappingTimeout, Uplink: link})
			p.host = p.nat.AddHost(p.name, lan)
			p.prof = profileOf(t)
		}
		peers[i] = p
	}
	return peers
}

func natIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 51, byte(100 + i/250), byte(i%250 + 1)})
}

func mustType(s string) nat.Type {
	t, err := nat.ParseType(s)
	if err != nil {
		panic(err)
	}
	return t
}

func profileOf(t nat.Type) nat.Profile {
	return nat.Profile{Mapping: t.Mapping, Filtering: t.Filtering, Allocation: t.Allocation, PortDelta: 1}
}

// start brings up a new generation on p.
func (p *peer) start(w *world, st *stats) (*gen, error) {
	id, err := identity.Generate()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sc, err := signal.Dial(ctx, w.SignalURL, id, nil)
	if err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	prof := p.prof
	host := p.host
	n, err := connect.Start(ctx, connect.Config{
		Identity: id, Signal: sc, STUN: w.STUN, Net: host, Profile: &prof, Relay: w.Relay,
		LocalIPs: func() ([]netip.Addr, error) { return host.Addrs(), nil },
		Punch:    punch.Config{Pace: time.Millisecond, ProbeInterval: time.Millisecond, CheckInterval: 20 * time.Millisecond},
	})
	if err != nil {
		sc.Close()
		return nil, err
	}
	g := &gen{p: p, id: id, sc: sc, node: n}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	if !p.manual {
		g.wg.Go(func() { g.acceptLoop(st) })
	}
	p.mu.Lock()
	p.cur = g
	p.mu.Unlock()
	return g, nil
}

// stop closes p's generation, if any.
func (p *peer) stop() {
	p.mu.Lock()
	g := p.cur
	p.cur = nil
	p.mu.Unlock()
	if g != nil {
		g.close()
	}
}

func (g *gen) acceptLoop(st *stats) {
	for {
		c, err := g.node.Accept(g.ctx)
		if err != nil {
			return
		}
		g.wg.Go(func() { g.serve(c, st) })
	}
}

// Transfer framing: the client sends an 8-byte length, the payload and its SHA-256;
// the server checks the digest and answers with the SHA-256 of what it read. A
// datagram is a 4-byte sequence number, filler and the SHA-256 of both.
const (
	dgramBody = 200
	dgramLen  = 4 + dgramBody + sha256.Size
	dgrams    = 20
)

// serve answers one accepted connection until the client closes the session.
func (g *gen) serve(c *connect.Conn, st *stats) {
	ctx, cancel := context.WithTimeout(g.ctx, 60*time.Second)
	defer cancel()
	s, err := session.New(ctx, c, sessionConfig(g.id))
	if err != nil {
		return // the client counts its side's failure
	}
	defer s.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		for {
			b, err := s.ReceiveDatagram(ctx)
			if err != nil {
				return
			}
			st.datagram(b)
		}
	})
	str, err := s.AcceptStream(ctx)
	if err != nil {
		return
	}
	if dl, ok := ctx.Deadline(); ok {
		str.SetDeadline(dl)
	}
	var hdr [8]byte
	if _, err := io.ReadFull(str, hdr[:]); err != nil {
		str.Reset()
		return
	}
	size := binary.BigEndian.Uint64(hdr[:])
	if size > 64<<20 {
		st.corrupt(fmt.Sprintf("server read an absurd length %d", size))
		str.Reset()
		return
	}
	h := sha256.New()
	if _, err := io.CopyN(h, str, int64(size)); err != nil {
		str.Reset()
		return
	}
	var sum [sha256.Size]byte
	if _, err := io.ReadFull(str, sum[:]); err != nil {
		str.Reset()
		return
	}
	got := h.Sum(nil)
	if string(got) != string(sum[:]) {
		st.corrupt(fmt.Sprintf("server: %d-byte payload's SHA-256 does not match the sender's", size))
	}
	if _, err := str.Write(got); err != nil {
		str.Reset()
		return
	}
	str.Close()
	// The client closes the session once it has the digest.
	select {
	case <-s.Done():
	case <-ctx.Done():
	}
}

// exchange runs one connection from g to target: connect, start a session, send
// datagrams and a stream, check the digest. It returns the method the connection
// ended on and the stream bytes, or where it failed.
func (g *gen) exchange(target identity.NodeID, rng *rand.Rand, pr params, st *stats, at *progress) (connect.Method, int, string, error) {
	at.set("connect")
	ctx, cancel := context.WithTimeout(g.ctx, 15*time.Second)
	c, err := g.node.Connect(ctx, target, connect.Options{MaxAttempts: 2})
	cancel()
	if err != nil {
		return 0, 0, "connect", err
	}
	st.connected(c.Method())
	at.set("session")
	ctx, cancel = context.WithTimeout(g.ctx, 60*time.Second)
	defer cancel()
	s, err := session.New(ctx, c, sessionConfig(g.id))
	if err != nil {
		return 0, 0, "session", err
	}
	defer s.Close()

	var seed [32]byte
	for i := range seed {
		seed[i] = byte(rng.Uint32())
	}
	fill := rand.NewChaCha8(seed)
	for i := range dgrams {
		b := make([]byte, dgramLen)
		binary.BigEndian.PutUint32(b, uint32(i))
		fill.Read(b[4 : 4+dgramBody])
		sum := sha256.Sum256(b[:4+dgramBody])
		copy(b[4+dgramBody:], sum[:])
		if s.SendDatagram(b) == nil {
			st.dgramsSent.Add(1)
		}
	}

	at.set("stream")
	str, err := s.OpenStream(ctx)
	if err != nil {
		return 0, 0, "stream", err
	}
	if dl, ok := ctx.Deadline(); ok {
		str.SetDeadline(dl)
	}
	size := pr.minBytes + rng.IntN(pr.maxBytes-pr.minBytes+1)
	payload := make([]byte, size)
	fill.Read(payload)
	want := sha256.Sum256(payload)
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(size))
	for _, b := range [][]byte{hdr[:], payload, want[:]} {
		if _, err := str.Write(b); err != nil {
			return 0, 0, "send", err
		}
	}
	str.Close()
	at.set(fmt.Sprintf("digest (%d bytes sent over %v)", size, s.Method()))
	var got [sha256.Size]byte
	if _, err := io.ReadFull(str, got[:]); err != nil {
		return 0, 0, "digest", err
	}
	if got != want {
		st.corrupt(fmt.Sprintf("client: server's digest of %d bytes differs from the sender's", size))
		return 0, 0, "", errors.New("digest mismatch")
	}
	return s.Method(), size, "", nil
}

// progress is where a worker's exchange is, for the log when one hangs.
type progress struct {
	mu    sync.Mutex
	stage string
	since time.Time
	desc  string
	// the two generations, to tell a hang from an interruption
	from, to *gen
}

func (p *progress) set(stage string) {
	p.mu.Lock()
	p.stage, p.since = stage, time.Now()
	p.mu.Unlock()
}

func (p *progress) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	state := func(g *gen) string {
		if g == nil {
			return "-"
		}
		return fmt.Sprintf("closed=%v rebound=%v", g.closed.Load(), g.rebound.Load())
	}
	return fmt.Sprintf("%s: %s for %v (initiator %s, responder %s)", p.desc, p.stage, time.Since(p.since).Round(time.Millisecond), state(p.from), state(p.to))
}

// sessionConfig is both ends' session setup. A peer whose node closes does not tell
// the other end (Node.Close sends no bye), so QUIC's idle timeout is what ends the
// session there; ten seconds keeps such exchanges from holding up the run.
func sessionConfig(id *identity.Identity) session.Config {
	return session.Config{Identity: id, IdleTimeout: 10 * time.Second}
}
