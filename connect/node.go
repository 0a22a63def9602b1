package connect

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/clock"
	"peerlink/detect"
	"peerlink/identity"
	"peerlink/mux"
	"peerlink/nat"
	"peerlink/netmon"
	"peerlink/nettype"
	"peerlink/portmap"
	"peerlink/punch"
	"peerlink/relay"
	"peerlink/signal"
)

// RelayConfig names the TURN server a node relays through.
type RelayConfig struct {
	// Server is the TURN server's host:port.
	Server string
	// Transport is UDP (the default), TCP or TLS; nodes whose UDP is blocked use TCP or
	// TLS whatever this says.
	Transport relay.Transport
	// Username and Password are long-term credentials; empty means short-lived TURN REST
	// credentials from the rendezvous server.
	Username, Password string
	// TLSServer is the relay's TLS endpoint (usually port 443), used instead of Server
	// when this node's UDP is blocked: TLS on 443 gets through most firewalls. Empty
	// means Server over TCP.
	TLSServer string
	// TLSConfig is used for TLS; nil verifies the server against the system roots.
	TLSConfig *tls.Config
}

// Config configures a Node. Identity, Signal and STUN are required, unless LAN is set:
// then Signal and STUN are optional and a node that has neither (or whose rendezvous
// server or STUN servers do not answer) still connects to peers on its own link.
type Config struct {
	// Identity is the node's key; it signs signaling and keys the checks.
	Identity *identity.Identity
	// Signal is a connected rendezvous client for Identity. The node reads its incoming
	// messages, so nothing else may call its Recv; the caller closes it after the node.
	// Nil (allowed only with LAN) means LAN-only.
	Signal *signal.Client
	// STUN lists the STUN observers ("host:port"), an RFC 5780 server first. Empty
	// (allowed only with LAN) means the NAT is not profiled.
	STUN []string
	// LAN, when set, makes the node findable on its link over mDNS and has Connect look
	// for the target there first and connect to it directly; nil means no LAN discovery.
	LAN *LANConfig
	// Relay, when set, is the relay the node falls back to (and starts on: relay-first).
	Relay *RelayConfig
	// Net opens every UDP socket; nil means the host's network.
	Net nettype.PacketListener
	// DialContext opens TCP connections (the relay over TCP or TLS); nil means the
	// host's network.
	DialContext func(ctx context.Context, network, address string) (net.Conn, error)
	// Bind is the main socket's local address; empty means any address, port 0.
	Bind string
	// LocalIPs lists the addresses offered as host candidates; nil means the host's
	// interface addresses, without loopback, link-local and container or VPN interfaces.
	// IPv4 addresses get the main socket's port; when there are global or unique-local
	// IPv6 addresses, the node opens a second socket (udp6) for them (ipv6.go).
	LocalIPs func() ([]netip.Addr, error)
	// Profile, when set, is used instead of detecting the NAT (a known environment).
	Profile *nat.Profile
	// Punch tunes hole punching; its Net, Clock, Logger, Observe and STUNServer are
	// set by the node.
	Punch punch.Config
	// PathCheck tunes the liveness checks on direct paths and the fallback to the
	// relay; the zero value is the defaults.
	PathCheck PathCheck
	// Refresh is how often the node re-learns its public address (a STUN Binding on
	// its main socket) so that a NAT that rebinds it, or a new public IP, is noticed
	// and peers are told; the relay allocation is checked on its own keepalive. Zero
	// means 20 s; negative turns the periodic check off (NetworkChanged still runs it).
	Refresh time.Duration
	// PortMap, when set, has the node ask its gateway for a port mapping of its main
	// socket (PCP, NAT-PMP or UPnP IGD, as portmap.Map does) in the background at
	// Start, and publish the mapped address as its public one: behind a NAT that cannot
	// be punched, a mapping makes the node reachable directly. The mapping is renewed
	// until Close and deleted then. Its Net and Dialer default to the node's. Nil means
	// no port mapping.
	PortMap *portmap.Config
	// WatchNetwork makes the node watch the host's interfaces and addresses (netlink
	// on Linux, polling elsewhere) and act on each change as on NetworkChanged. The
	// watch is opened at Start in the calling thread's network namespace. False means
	// the caller reports changes, if anyone does.
	WatchNetwork bool
	// Clock is the time source; nil means the real clock.
	Clock clock.Clock
	// Logger receives progress; nil means quiet.
	Logger *slog.Logger
}

// Node is one peerlink endpoint: it connects to peers and accepts their connections.
type Node struct {
	cfg    Config
	id     *identity.Identity
	sig    atomic.Pointer[signal.Client] // SetSignal replaces it
	log    *slog.Logger
	clock  clock.Clock
	net    nettype.PacketListener
	main   *mux.Mux
	v6     *mux.Mux // the IPv6 socket (ipv6.go); nil without a usable IPv6 address
	engine *punch.Engine
	det    *detect.Detector

	addrMu  sync.Mutex // guards profile's public address and srflx, which Refresh moves
	profile nat.Profile
	srflx   netip.AddrPort
	hosts   []netip.AddrPort
	stunSrv netip.AddrPort
	poke    chan struct{} // NetworkChanged: refresh now
	netmon  *netmon.Monitor
	mapping *portmap.Mapping // under addrMu

	relayMu     sync.Mutex
	relay       *relay.Conn
	relayErr    error
	relayFailed time.Time     // when the last allocation failed
	relayDone   chan struct{} // closed when the first allocation at Start has ended
	published   chan struct{} // closed when Start has published the node

	mu       sync.Mutex
	conns    map[uint64]*Conn
	sessions map[string]*Conn
	closed   bool

	lan *lanState // nil without Config.LAN

	// wgKey is the WireGuard public key (hex) the node offers with its connection
	// information; empty when it runs no WireGuard device.
	wgKey atomic.Pointer[string]

	accept chan *Conn
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// Start opens the node's socket, profiles its NAT, publishes how to reach it and starts
// accepting connections.
func Start(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.Identity == nil || (cfg.Signal == nil && cfg.LAN == nil) {
		return nil, errors.New("connect: Config needs Identity and Signal (or LAN)")
	}
	if len(cfg.STUN) == 0 && cfg.LAN == nil {
		return nil, fmt.Errorf("connect: %w: Config.STUN is empty", ErrNoObservers)
	}
	n := &Node{
		cfg: cfg, id: cfg.Identity, log: cfg.Logger, clock: clock.Or(cfg.Clock),
		net: nettype.Or(cfg.Net), conns: map[uint64]*Conn{}, sessions: map[string]*Conn{},
		accept: make(chan *Conn, 16), relayDone: make(chan struct{}), published: make(chan struct{}),
		poke: make(chan struct{}, 1),
	}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	if cfg.Signal != nil {
		n.sig.Store(cfg.Signal)
	}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	localIPs := cfg.LocalIPs
	if localIPs == nil {
		localIPs = hostIPs
	}
	// The detector recognises "no NAT" from every local address, loopback included;
	// candidates leave some out, so it gets its own list unless one was given.
	n.det = detect.New(detect.Config{Observers: cfg.STUN, Net: n.net, LocalIPs: cfg.LocalIPs, Clock: cfg.Clock, Logger: cfg.Logger})
	var stunSrv netip.AddrPort
	if len(cfg.STUN) > 0 {
		var err error
		if stunSrv, err = netip.ParseAddrPort(cfg.STUN[0]); err != nil {
			n.det.Close()
			return nil, fmt.Errorf("connect: STUN observer %q must be ip:port: %w", cfg.STUN[0], err)
		}
	}
	n.stunSrv = stunSrv
	pc := cfg.Punch
	pc.Net, pc.Clock, pc.Logger, pc.Observe, pc.STUNServer = n.net, cfg.Clock, cfg.Logger, n.det.AddObservation, stunSrv
	n.engine = punch.New(pc)
	bind := cfg.Bind
	if bind == "" {
		bind = ":0"
	}
	conn, err := n.net.ListenPacket(ctx, "udp4", bind)
	if err != nil {
		n.det.Close()
		return nil, fmt.Errorf("connect: main socket: %w", err)
	}
	setSocketBuffers(conn)
	n.main = n.engine.NewMux(conn, mux.Config{Clock: cfg.Clock, Logger: cfg.Logger})
	fail := func(err error) (*Node, error) {
		n.Close()
		return nil, err
	}

	switch {
	case cfg.Profile != nil:
		n.profile = *cfg.Profile
	case len(cfg.STUN) == 0:
		// LAN-only: peers on the link need no profile.
	default:
		p, err := n.det.Detect(ctx, detect.Options{})
		switch {
		case err == nil || p.UDPBlocked:
			n.profile = p
		case cfg.LAN != nil:
			// No STUN server answers (no internet, say): the link still works.
			n.log.Warn("connect: NAT profiling failed; going on for the LAN", "err", err)
		default:
			return fail(fmt.Errorf("connect: profiling the NAT: %w", err))
		}
	}
	if !n.profile.UDPBlocked && stunSrv.IsValid() {
		bctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		var err error
		n.srflx, err = n.main.Binding(bctx, stunSrv, 200*time.Millisecond)
		cancel()
		if err != nil {
			n.log.Debug("connect: no reflexive address for the main socket", "err", err)
		} else {
			// Peers reach the main socket: its mapping is the public address that counts.
			n.profile.PublicIP, n.profile.PublicPort = n.srflx.Addr(), n.srflx.Port()
		}
	}
	if ips, err := localIPs(); err == nil {
		for _, ip := range ips {
			if ip.Unmap().Is4() {
				n.hosts = append(n.hosts, netip.AddrPortFrom(ip.Unmap(), n.main.LocalAddr().Port()))
			}
		}
		n.startIPv6(ctx, ips)
	}
	if cfg.LAN != nil {
		if err := n.startLAN(ctx); err != nil {
			return fail(err)
		}
	}
	if cfg.PortMap != nil && !n.profile.UDPBlocked && !n.profile.Open {
		n.startPortMap()
	}
	if cfg.Relay != nil && n.signal() != nil {
		// Relay-first: allocate now, in the background, so that an allocation is
		// usually ready before anyone connects, and a relay that is down does not
		// hold up the start. Connect waits for this attempt if it is still going.
		n.wg.Go(func() {
			defer close(n.relayDone)
			if _, err := n.ensureRelay(n.ctx); err != nil {
				return
			}
			// The first publication may have gone out without the relayed candidate;
			// peers that look the node up must see it.
			select {
			case <-n.published:
			case <-n.ctx.Done():
				return
			}
			pctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
			defer cancel()
			if err := n.signal().Publish(pctx, n.info()); err != nil {
				n.log.Debug("connect: publishing the relayed candidate", "err", err)
			}
		})
	} else {
		close(n.relayDone)
	}
	if n.signal() != nil {
		if err := n.signal().Publish(ctx, n.info()); err != nil {
			if cfg.LAN == nil {
				return fail(fmt.Errorf("connect: publishing: %w", err))
			}
			n.log.Warn("connect: publishing failed; only peers on the LAN can connect", "err", err)
		}
	}
	close(n.published)
	if sc := n.signal(); sc != nil {
		n.wg.Go(func() { n.signalLoop(sc) })
		n.wg.Go(func() { n.acceptRelays(sc) })
	}
	n.wg.Go(func() { n.dataLoop(n.main.Data(), nil) })
	if cfg.WatchNetwork {
		m, err := netmon.New(netmon.Config{Logger: cfg.Logger})
		if err != nil {
			return fail(fmt.Errorf("connect: watching the network: %w", err))
		}
		n.netmon = m
		n.wg.Go(func() {
			for {
				select {
				case <-m.Changes():
					n.log.Info("connect: the network changed")
					n.NetworkChanged()
				case <-n.ctx.Done():
					return
				}
			}
		})
	}
	if n.signal() != nil {
		n.wg.Go(n.maintain)
	}
	n.log.Info("connect: node up", "node", n.id.NodeID().Short(), "profile", n.Profile().String(), "reflexive", n.reflexive())
	return n, nil
}

// WaitRelay waits until the relay allocation begun at Start has ended (and, when it
// succeeded, the relayed candidate is published) and returns its error: nil when the
// node has a relay, ErrNoRelay when none is configured or it could not be reached.
func (n *Node) WaitRelay(ctx context.Context) error {
	select {
	case <-n.relayDone:
	case <-ctx.Done():
		return ctx.Err()
	}
	_, err := n.ensureRelay(ctx)
	return err
}

// NodeID is this node's ID.
func (n *Node) NodeID() identity.NodeID { return n.id.NodeID() }

// Profile is this node's NAT profile, with its current public address.
func (n *Node) Profile() nat.Profile {
	n.addrMu.Lock()
	defer n.addrMu.Unlock()
	return n.profile
}

// reflexive is the main socket's public address as the STUN server last saw it.
func (n *Node) reflexive() netip.AddrPort {
	n.addrMu.Lock()
	defer n.addrMu.Unlock()
	return n.srflx
}

// signal is the current rendezvous client; nil for a LAN-only node.
func (n *Node) signal() *signal.Client { return n.sig.Load() }

// SetSignal gives the node a new rendezvous client for its identity, dialed after the
// old one's connection ended (a server restart, a network change). The node reads
// messages from it, publishes itself there, and goes on; its connections, which need
// no server once made, are not touched. The caller closes the old client.
func (n *Node) SetSignal(ctx context.Context, sc *signal.Client) error {
	if sc == nil {
		return errors.New("connect: SetSignal needs a client")
	}
	n.mu.Lock()
	closed := n.closed
	if !closed {
		n.wg.Add(1)
	}
	n.mu.Unlock()
	if closed {
		return ErrClosed
	}
	defer n.wg.Done()
	old := n.sig.Swap(sc)
	if old == nil {
		n.sig.CompareAndSwap(sc, nil)
		return errors.New("connect: SetSignal on a node started without Signal")
	}
	n.wg.Go(func() { n.signalLoop(sc) })
	n.wg.Go(func() { n.acceptRelays(sc) })
	if err := sc.Publish(ctx, n.info()); err != nil {
		return fmt.Errorf("connect: publishing on the new rendezvous client: %w", err)
	}
	return nil
}

// Detector is the node's NAT detector (for Subscribe, Refresh).
func (n *Node) Detector() *detect.Detector { return n.det }

// info is this node's connection information: profile and candidates.
func (n *Node) info() signal.ConnectionInfo {
	var cands []signal.Candidate
	for i, h := range n.hosts {
		cands = append(cands, signal.Candidate{Type: signal.CandidateHost, IP: h.Addr(), Port: h.Port(), Priority: signal.CandidatePriority(signal.CandidateHost, uint16(65535-i))})
	}
	srflx := n.reflexive()
	if srflx.IsValid() {
		cands = append(cands, srflxCandidate(srflx))
	}
	if ra := n.relayAddr(); ra.IsValid() {
		cands = append(cands, relayedCandidate(ra))
	}
	p := n.Profile()
	if srflx.IsValid() {
		p.PublicIP, p.PublicPort = srflx.Addr(), srflx.Port()
	}
	ci := signal.NewConnectionInfo(p, n.main.LocalAddr(), cands)
	if k := n.wgKey.Load(); k != nil {
		ci.WGPublicKey = *k
	}
	return ci
}

// SetWGPublicKey makes the node offer key (a WireGuard public key, 64 hex digits; empty
// for none) in its signed offers, answers and published information, so that peers
// learn it from signaling the node signed (see Conn.PeerInfo). The node publishes
// again at once; connections made before the call keep what they exchanged.
func (n *Node) SetWGPublicKey(ctx context.Context, key string) error {
	if key == "" {
		n.wgKey.Store(nil)
	} else {
		n.wgKey.Store(&key)
	}
	sc := n.signal()
	if sc == nil {
		return nil
	}
	if err := sc.Publish(ctx, n.info()); err != nil {
		return fmt.Errorf("connect: publishing the WireGuard key: %w", err)
	}
	return nil
}

// relayRetry is how long a failed relay allocation is remembered before trying again.
const relayRetry = 10 * time.Second

// ensureRelay allocates on the relay once; later calls return the allocation or the
// error of the last try (retrying after it).
func (n *Node) ensureRelay(ctx context.Context) (*relay.Conn, error) {
	n.relayMu.Lock()
	defer n.relayMu.Unlock()
	if n.relay != nil {
		return n.relay, nil
	}
	rc := n.cfg.Relay
	if rc == nil {
		return nil, fmt.Errorf("%w: no relay configured", ErrNoRelay)
	}
	if n.relayErr != nil && n.clock.Now().Sub(n.relayFailed) < relayRetry {
		return nil, n.relayErr // failed moments ago: do not make every connection wait again
	}
	user, pass := rc.Username, rc.Password
	if user == "" && n.signal() == nil {
		n.relayErr, n.relayFailed = fmt.Errorf("%w: TURN credentials need a rendezvous server", ErrNoRelay), n.clock.Now()
		return nil, n.relayErr
	}
	if user == "" {
		cred, err := n.signal().TURNCredentials(ctx)
		if err != nil {
			n.relayErr, n.relayFailed = fmt.Errorf("%w: TURN credentials: %w", ErrNoRelay, err), n.clock.Now()
			return nil, n.relayErr
		}
		user, pass = cred.Username, cred.Password
	}
	server, transport := rc.Server, rc.Transport
	if n.Profile().UDPBlocked {
		switch {
		case rc.TLSServer != "":
			server, transport = rc.TLSServer, relay.TLS
		case transport == "" || transport == relay.UDP:
			transport = relay.TCP
		}
	}
	// A relay that does not answer must not hold up connecting for long: direct paths
	// may still work, and the error says which relay failed.
	actx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := relay.Dial(actx, relay.ClientConfig{Server: server, Transport: transport, Username: user, Password: pass, TLSConfig: rc.TLSConfig,
		Listener: n.net, DialContext: n.cfg.DialContext, Logger: n.cfg.Logger})
	if err != nil {
		n.relayErr, n.relayFailed = fmt.Errorf("%w: relay %s (%s) is unreachable or refused us: %w", ErrNoRelay, server, cmpTransport(transport), err), n.clock.Now()
		return nil, n.relayErr
	}
	n.relay, n.relayErr = c, nil
	n.wg.Go(func() { n.dataLoop(c, c) })
	return c, nil
}

func (n *Node) relayAddr() netip.AddrPort {
	n.relayMu.Lock()
	defer n.relayMu.Unlock()
	if n.relay == nil {
		return netip.AddrPort{}
	}
	return addrPortOf(n.relay.RelayedAddr())
}

// Connect connects to target. It returns once a path works — the relay's, usually
// first — and keeps upgrading to a direct path in the background unless
// opts.NoDirect; Conn.Method follows.
func (n *Node) Connect(ctx context.Context, target identity.NodeID, opts Options) (*Conn, error) {
	var err error
	for range max(opts.MaxAttempts, 1) {
		var c *Conn
		c, err = n.connectOnce(ctx, target, opts)
		if err == nil || errors.Is(err, ErrPeerOffline) || errors.Is(err, ErrSymmetricNAT) || errors.Is(err, ErrPeerMismatch) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
			return c, err
		}
		n.log.Debug("connect: attempt failed, retrying", "peer", target.Short(), "err", err)
	}
	return nil, err
}

func (n *Node) connectOnce(ctx context.Context, target identity.NodeID, opts Options) (*Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout())
	defer cancel()
	if n.lan != nil && !(opts.NoDirect && !opts.NoRelay) {
		c, err := n.connectLAN(ctx, target, opts)
		if err == nil || n.signal() == nil || errors.Is(err, ErrClosed) {
			return c, err
		}
		n.log.Debug("connect: not over the LAN, trying the rendezvous server", "peer", target.Short(), "err", err)
	}
	session := newSession()
	c, err := n.newConn(target, session, true, opts)
	if err != nil {
		return nil, err
	}
	if !opts.NoRelay && n.cfg.Relay != nil {
		n.ensureRelay(ctx)
	}
	info := n.info()
	if err := n.signal().Send(ctx, &signal.Message{Type: signal.TypeOffer, To: target, Session: session, Info: &info}); err != nil {
		c.closeWith(err)
		return nil, fmt.Errorf("connect: offer to %s: %w", target.Short(), err)
	}
	n.wg.Go(func() { c.run(info) })
	return c.waitReady(ctx)
}

// Accept waits for a connection a peer started.
func (n *Node) Accept(ctx context.Context) (*Conn, error) {
	select {
	case c := <-n.accept:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-n.ctx.Done():
		return nil, ErrClosed
	}
}

// Attempt describes a connection being set up.
type Attempt struct {
	Peer      identity.NodeID
	Session   string
	Initiator bool
	Technique nat.Technique
	Method    Method // the path so far (MethodNone before the first)
	Started   time.Time
}

// Pending lists connections still being set up, or still trying for a direct path.
func (n *Node) Pending() []Attempt {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []Attempt
	for _, c := range n.sessions {
		c.mu.Lock()
		if !c.settled {
			out = append(out, Attempt{Peer: c.peer, Session: c.session, Initiator: c.initiator, Technique: c.technique, Method: c.method, Started: c.started})
		}
		c.mu.Unlock()
	}
	return out
}

// Close closes every connection and the node's sockets, and waits for its goroutines.
// It does not close Config.Signal. It is idempotent.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	conns := make([]*Conn, 0, len(n.sessions))
	for _, c := range n.sessions {
		conns = append(conns, c)
	}
	n.mu.Unlock()
	n.cancel()
	// Each connection says bye, so that its peer's Recv ends at once rather than at a
	// timeout; at the same time, so that a slow rendezvous server delays Close by one
	// bye at most.
	var byes sync.WaitGroup
	for _, c := range conns {
		byes.Go(func() { c.Close() })
	}
	byes.Wait()
	n.engine.Close()
	n.main.Close()
	if n.v6 != nil {
		n.v6.Close()
	}
	n.relayMu.Lock()
	if n.relay != nil {
		n.relay.Close()
	}
	n.relayMu.Unlock()
	n.det.Close()
	if n.lan != nil {
		n.lan.close()
	}
	if n.netmon != nil {
		n.netmon.Close()
	}
	n.wg.Wait()
	if m := n.PortMapping(); m != nil {
		m.Close() // deletes it on the gateway
	}
	return nil
}

// signalLoop hands each incoming message to its session, and starts accepting offers.
func (n *Node) signalLoop(sc *signal.Client) {
	for {
		m, err := sc.Recv(n.ctx)
		if err != nil {
			if n.ctx.Err() == nil && n.signal() == sc {
				n.log.Warn("connect: signaling ended", "err", err)
			}
			return
		}
		n.mu.Lock()
		c := n.sessions[m.Session]
		n.mu.Unlock()
		switch {
		case c != nil:
			c.deliver(m)
		case m.Type == signal.TypeOffer && m.Info != nil:
			c, err := n.newConn(m.From, m.Session, false, Options{})
			if err != nil {
				continue
			}
			n.wg.Go(func() { c.respond(m) })
		}
	}
}

// dataLoop reads a socket's data path (the main socket's, an extra punched socket's or
// the relay's) and hands each packet to its connection. via is the relay when the
// packets came through it.
func (n *Node) dataLoop(pc net.PacketConn, via *relay.Conn) {
	buf := make([]byte, 64<<10)
	for {
		k, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || n.ctx.Err() != nil {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			n.log.Debug("connect: data read ended", "err", err)
			return
		}
		id, kind, payload, ok := parseFrame(buf[:k])
		if !ok {
			continue
		}
		if id == 0 {
			// Connection ID zero: LAN handshakes, which come before any connection.
			if n.lan != nil && via == nil {
				n.lanFrame(kind, payload, addrPortOf(from), pc)
			}
			continue
		}
		n.mu.Lock()
		c := n.conns[id]
		n.mu.Unlock()
		if c != nil {
			c.receive(kind, payload, addrPortOf(from), pc, via)
		}
	}
}

func (n *Node) newConn(peer identity.NodeID, session string, initiator bool, opts Options) (*Conn, error) {
	return n.newConnWith(peer, session, initiator, opts, nil)
}

// newConnWith is newConn with setup run on the connection before anything can find it.
func (n *Node) newConnWith(peer identity.NodeID, session string, initiator bool, opts Options, setup func(*Conn)) (*Conn, error) {
	key, err := n.id.SharedKey(peer, []byte(session), 48)
	if err != nil {
		return nil, err
	}
	c := newConn(n, peer, session, initiator, opts, key)
	if setup != nil {
		setup(c)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, ErrClosed
	}
	n.sessions[session] = c
	n.conns[c.recvID] = c
	return c, nil
}

func (n *Node) forget(c *Conn) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.sessions, c.session)
	delete(n.conns, c.recvID)
}

func newSession() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if u, ok := a.(*net.UDPAddr); ok {
		ap := u.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// hostIPs lists the host's usable addresses for host candidates: IPv4 and global or
// unique-local IPv6, no loopback or link-local, and no container, bridge or VPN
// interfaces, whose addresses peers cannot reach and which would only cost checks.
func hostIPs() ([]netip.Addr, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || skipInterface(ifc.Name) {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			p, err := netip.ParsePrefix(a.String())
			if err != nil {
				continue
			}
			ip := p.Addr().Unmap()
			if (ip.Is4() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast()) || usableIPv6(ip) {
				out = append(out, ip)
			}
		}
	}
	return out, nil
}

func skipInterface(name string) bool {
	for _, p := range []string{"docker", "br-", "veth", "virbr", "tun", "tap", "wg", "tailscale", "zt", "utun", "lo"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// socketBuffer is what the main socket asks the kernel for in each direction: a
// session's bursts at full speed overflow the usual 208 KiB default. The kernel caps it
// at net.core.rmem_max / wmem_max.
const socketBuffer = 4 << 20

func setSocketBuffers(pc net.PacketConn) {
	if s, ok := pc.(interface{ SetReadBuffer(int) error }); ok {
		s.SetReadBuffer(socketBuffer)
	}
	if s, ok := pc.(interface{ SetWriteBuffer(int) error }); ok {
		s.SetWriteBuffer(socketBuffer)
	}
}

func cmpTransport(t relay.Transport) relay.Transport {
	if t == "" {
		return relay.UDP
	}
	return t
}
