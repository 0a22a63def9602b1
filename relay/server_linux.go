package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/stun/v3"
	"golang.org/x/sys/unix"

	"peerlink/clock"
	"peerlink/internal/ratelimit"
)

// Server is a TURN relay. Create it with New, start it with Start or ListenAndServe and
// stop it with Close.
type Server struct {
	cfg      Config
	log      *slog.Logger
	clock    clock.Clock
	epoch    time.Time
	auth     *authenticator
	policy   peerPolicy
	capacity *bucket
	ports    portRange
	relayIP4 netip.Addr
	relayIP6 netip.Addr
	// relayKey4 and relayKey6 are the relay IPs in addrKey form (zero when unset), to
	// tell cheaply whether a peer may be one of this relay's own relayed addresses.
	relayKey4, relayKey6 [16]byte
	// selfPorts and selfIPs are where the relay listens for clients: data to them is
	// dropped, so no one can loop the relay into itself (RFC 8656 §21.2.3).
	selfPorts []uint16
	selfIPs   map[[16]byte]bool
	hooks     *hookQueue
	// requests is the per-source request limiter (nil when disabled); logLimit and
	// logAll bound the log lines about limited sources: one a source every
	// limitLogEvery, a few a second in all, so a flood cannot flood the log too.
	requests         *ratelimit.Table
	logLimit, logAll *ratelimit.Table

	disabled      atomic.Bool
	closing       atomic.Bool
	nextID        atomic.Uint64
	sessionsTotal atomic.Uint64
	refused       atomic.Uint64
	refusedBy     [numRefuseReasons]atomic.Uint64
	tcpCtr        counters // client-to-peer traffic of TCP and TLS clients

	mu           sync.Mutex
	started      bool
	closed       bool
	sessions     int
	perUser      map[string]int
	perSource    map[sourceKey]int
	reservations map[uint64]reservation
	conns        map[*tcpConn]struct{}
	sweepTimer   clock.Timer

	loops     []*loop
	udpAddrs  []netip.AddrPort
	listeners []tcpListener
	tcpAddrs  map[Transport]netip.AddrPort
	regCancel context.CancelFunc
	collector *collector
	wg        sync.WaitGroup
	closeOnce sync.Once
	closedCh  chan struct{}
}

type tcpListener struct {
	net.Listener
	t Transport
}

type reservation struct {
	fd      int
	addr    netip.AddrPort
	expires time.Time
}

// New checks cfg and returns a server that is not yet listening.
func New(cfg Config) (*Server, error) {
	if cfg.ListenUDP == "" && cfg.ListenTCP == "" && cfg.ListenTLS == "" {
		return nil, &ConfigError{"ListenUDP", errors.New("no listen address")}
	}
	if len(cfg.Users) == 0 && cfg.Secret == "" {
		return nil, ErrNoCredentials
	}
	if cfg.ListenTLS != "" && (cfg.TLSConfig == nil || len(cfg.TLSConfig.Certificates) == 0 && cfg.TLSConfig.GetCertificate == nil) {
		return nil, &ConfigError{"TLSConfig", errors.New("ListenTLS needs a certificate")}
	}
	if cfg.MinPort > cfg.MaxPort || (cfg.MinPort == 0) != (cfg.MaxPort == 0) {
		return nil, &ConfigError{"MinPort", fmt.Errorf("bad port range %d-%d", cfg.MinPort, cfg.MaxPort)}
	}
	if cfg.RelayIP.IsValid() && !cfg.RelayIP.Unmap().Is4() {
		return nil, &ConfigError{"RelayIP", fmt.Errorf("%v is not IPv4", cfg.RelayIP)}
	}
	if cfg.RelayIPv6.IsValid() && !cfg.RelayIPv6.Is6() {
		return nil, &ConfigError{"RelayIPv6", fmt.Errorf("%v is not IPv6", cfg.RelayIPv6)}
	}
	cfg.Realm = cmp.Or(cfg.Realm, "peerlink")
	cfg.NonceLifetime = cmp.Or(cfg.NonceLifetime, 10*time.Minute)
	cfg.HeartbeatInterval = cmp.Or(cfg.HeartbeatInterval, 10*time.Second)
	cfg.PerSourceQuota = cmp.Or(cfg.PerSourceQuota, DefaultPerSourceQuota)
	cfg.RequestLimit = cfg.RequestLimit.withDefaults()
	if err := cfg.RequestLimit.check(); err != nil {
		return nil, &ConfigError{"RequestLimit", err}
	}
	if cfg.Loops <= 0 {
		cfg.Loops = max(1, runtime.GOMAXPROCS(0)/2)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		cfg:          cfg,
		log:          log,
		clock:        clock.Or(cfg.Clock),
		auth:         newAuthenticator(&cfg),
		policy:       peerPolicy{loopback: cfg.AllowLoopbackPeers, private: cfg.AllowPrivatePeers, denied: cfg.DeniedPeers},
		capacity:     newBucket(cfg.TotalCapacity),
		ports:        portRange{cfg.MinPort, cfg.MaxPort},
		perUser:      make(map[string]int),
		perSource:    make(map[sourceKey]int),
		reservations: make(map[uint64]reservation),
		conns:        make(map[*tcpConn]struct{}),
		tcpAddrs:     make(map[Transport]netip.AddrPort),
		closedCh:     make(chan struct{}),
	}
	s.epoch = s.clock.Now()
	if rl := cfg.RequestLimit; !rl.Disabled {
		s.requests = ratelimit.New(rl.Rate, rl.Burst, rl.MaxSources)
	}
	s.logLimit = ratelimit.New(1/limitLogEvery.Seconds(), 1, 4096)
	s.logAll = ratelimit.New(2, 10, 1)
	return s, nil
}

// ListenAndServe starts the server and relays until ctx is done or Close is called; it
// returns nil after a clean shutdown.
func (s *Server) ListenAndServe(ctx context.Context) error {
	if err := s.Start(); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-s.closedCh:
	}
	return s.Close()
}

// Start opens the listeners and relayed-address machinery and returns once the relay
// is serving.
func (s *Server) Start() (err error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if s.started {
		s.mu.Unlock()
		return errors.New("relay: already started")
	}
	s.started = true
	s.mu.Unlock()
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	for range s.cfg.Loops {
		l, err := newLoop(s)
		if err != nil {
			return fmt.Errorf("relay: event loop: %w", err)
		}
		s.loops = append(s.loops, l)
	}
	if err := s.listenUDP(); err != nil {
		return err
	}
	ctx := context.Background()
	for _, ln := range []struct {
		t    Transport
		addr string
	}{{TCP, s.cfg.ListenTCP}, {TLS, s.cfg.ListenTLS}} {
		if ln.addr == "" {
			continue
		}
		addr := ln.addr
		if ln.t == TCP && addr == s.cfg.ListenUDP && len(s.udpAddrs) > 0 {
			// Same address for both: with port 0, TCP takes the port UDP got, so the
			// relay has one port as usual (falling back to any port if it is taken).
			if host, port, _ := net.SplitHostPort(addr); port == "0" {
				addr = net.JoinHostPort(host, strconv.Itoa(int(s.udpAddrs[0].Port())))
			}
		}
		l, err := (&net.ListenConfig{}).Listen(ctx, "tcp", addr)
		if err != nil && addr != ln.addr {
			l, err = (&net.ListenConfig{}).Listen(ctx, "tcp", ln.addr)
		}
		if err != nil {
			return fmt.Errorf("relay: listen %s: %w", ln.t, err)
		}
		s.listeners = append(s.listeners, tcpListener{l, ln.t})
		s.tcpAddrs[ln.t] = l.Addr().(*net.TCPAddr).AddrPort()
	}
	s.pickRelayIPs()
	if !s.relayIP4.IsValid() && !s.relayIP6.IsValid() {
		return &ConfigError{"RelayIP", errors.New("no relay address: set RelayIP")}
	}
	if s.relayIP4.IsValid() {
		s.relayKey4 = s.relayIP4.As16()
	}
	if s.relayIP6.IsValid() {
		s.relayKey6 = s.relayIP6.As16()
	}
	s.findSelf()

	s.hooks = newHookQueue()
	for _, l := range s.loops {
		l.running = true
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			l.run()
		}()
	}
	for _, ln := range s.listeners {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.accept(ln.Listener, ln.t)
		}()
	}
	s.mu.Lock()
	s.sweepTimer = s.clock.AfterFunc(time.Second, s.sweep)
	s.mu.Unlock()
	if s.cfg.Metrics != nil {
		s.collector = newCollector(s)
		if err := s.cfg.Metrics.Register(s.collector); err != nil {
			s.collector = nil
			return fmt.Errorf("relay: metrics: %w", err)
		}
	}
	if s.cfg.Registrar != nil {
		rctx, cancel := context.WithCancel(context.Background())
		s.regCancel = cancel
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.heartbeat(rctx)
		}()
	}
	s.log.Info("relay listening", "udp", s.udpAddrs, "tcp", s.tcpAddrs[TCP], "tls", s.tcpAddrs[TLS], "relay_ip", s.relayIP4, "relay_ipv6", s.relayIP6)
	return nil
}

// listenUDP opens the client-facing UDP sockets, one per loop and address family.
func (s *Server) listenUDP() error {
	if s.cfg.ListenUDP == "" {
		return nil
	}
	ap, err := parseListen(s.cfg.ListenUDP)
	if err != nil {
		return &ConfigError{"ListenUDP", err}
	}
	hosts := []netip.Addr{ap.Addr()}
	if ap.Addr() == netip.IPv6Unspecified() {
		hosts = []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()}
	}
	port := ap.Port()
	reuse := len(s.loops) > 1
	for i, host := range hosts {
		for _, l := range s.loops {
			fd, bound, err := udpSocket(netip.AddrPortFrom(host, port), reuse, sockBuf)
			if err != nil {
				if i > 0 && l == s.loops[0] {
					// IPv6 beside IPv4 is best effort: the host may not have it.
					s.log.Info("no IPv6 UDP listener", "err", err)
					break
				}
				return fmt.Errorf("relay: listen udp: %w", err)
			}
			port = bound.Port()
			if err := l.addListener(fd, !host.Is4()); err != nil {
				unix.Close(fd)
				return fmt.Errorf("relay: listen udp: %w", err)
			}
			if l == s.loops[0] {
				s.udpAddrs = append(s.udpAddrs, bound)
			}
		}
	}
	return nil
}

func parseListen(addr string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port %q", port)
	}
	ip := netip.IPv6Unspecified() // both families
	if host != "" {
		if ip, err = netip.ParseAddr(host); err != nil {
			return netip.AddrPort{}, fmt.Errorf("listen host must be an IP address: %w", err)
		}
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(p)), nil
}

// pickRelayIPs settles the addresses relayed sockets bind to.
func (s *Server) pickRelayIPs() {
	s.relayIP4, s.relayIP6 = s.cfg.RelayIP.Unmap(), s.cfg.RelayIPv6
	var listen []netip.Addr
	for _, ap := range s.udpAddrs {
		listen = append(listen, ap.Addr())
	}
	for _, ap := range s.tcpAddrs {
		listen = append(listen, ap.Addr().Unmap())
	}
	for _, ip := range listen {
		switch {
		case ip.IsUnspecified():
		case ip.Is4() && !s.relayIP4.IsValid():
			s.relayIP4 = ip
		case ip.Is6() && !s.relayIP6.IsValid():
			s.relayIP6 = ip
		}
	}
	specific := len(listen) > 0
	for _, ip := range listen {
		specific = specific && !ip.IsUnspecified()
	}
	if specific {
		return // listening on specific addresses only: relay on those families only
	}
	if !s.relayIP4.IsValid() {
		s.relayIP4 = outboundIP("udp4", "192.0.2.1:9")
	}
	if !s.relayIP6.IsValid() {
		s.relayIP6 = outboundIP("udp6", "[2001:db8::1]:9")
	}
}

// findSelf records the relay's own client-facing addresses: its listen addresses, and
// every address of the host when it listens on all of them.
func (s *Server) findSelf() {
	s.selfIPs = make(map[[16]byte]bool)
	self := append([]netip.AddrPort(nil), s.udpAddrs...)
	for _, ap := range s.tcpAddrs {
		self = append(self, unmapAddrPort(ap))
	}
	all := false
	for _, ap := range self {
		if !slices.Contains(s.selfPorts, ap.Port()) {
			s.selfPorts = append(s.selfPorts, ap.Port())
		}
		s.selfIPs[ap.Addr().As16()] = true
		all = all || ap.Addr().IsUnspecified()
	}
	s.selfIPs[s.relayKey4], s.selfIPs[s.relayKey6] = true, true
	if !all {
		return
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		s.log.Warn("listing interface addresses", "err", err)
		return
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			s.selfIPs[p.Addr().Unmap().As16()] = true
		}
	}
}

// isSelf reports whether peer is one of the relay's own client-facing addresses.
func (s *Server) isSelf(peer addrKey) bool {
	for _, p := range s.selfPorts {
		if peer.port == p {
			return s.selfIPs[peer.ip]
		}
	}
	return false
}

// outboundIP is the source address the host would use toward dst; connecting a UDP
// socket sends nothing.
func outboundIP(network, dst string) netip.Addr {
	c, err := net.Dial(network, dst)
	if err != nil {
		return netip.Addr{}
	}
	defer c.Close()
	ip := c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
	if ip.IsLoopback() || ip.IsLinkLocalUnicast() {
		return netip.Addr{}
	}
	return ip
}

// Addrs returns the addresses the server listens on, by transport.
func (s *Server) Addrs() map[Transport][]netip.AddrPort {
	m := make(map[Transport][]netip.AddrPort)
	m[UDP] = append([]netip.AddrPort(nil), s.udpAddrs...)
	for t, ap := range s.tcpAddrs {
		m[t] = []netip.AddrPort{ap}
	}
	return m
}

// Close stops the server: listeners close, every session ends (OnSessionEnd with reason
// "shutdown"), and Close returns once every goroutine has. It is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(s.shutdown)
	return nil
}

func (s *Server) shutdown() {
	s.closing.Store(true)
	s.mu.Lock()
	s.closed = true
	if s.sweepTimer != nil {
		s.sweepTimer.Stop()
	}
	conns := make([]*tcpConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	if s.regCancel != nil {
		s.regCancel()
	}
	for _, ln := range s.listeners {
		ln.Close()
	}
	for _, c := range conns {
		c.close()
	}
	for _, l := range s.loops {
		l.post(func() { l.quit = true })
	}
	s.wg.Wait()
	for _, l := range s.loops {
		if !l.running {
			l.shutdown() // never ran: release its sockets here
		}
	}
	s.mu.Lock()
	for tok, r := range s.reservations {
		unix.Close(r.fd)
		delete(s.reservations, tok)
	}
	s.mu.Unlock()
	if s.hooks != nil {
		s.hooks.close()
	}
	if s.collector != nil {
		s.cfg.Metrics.Unregister(s.collector)
	}
	close(s.closedCh)
}

// Enable lets new allocations in again after Disable.
func (s *Server) Enable() { s.disabled.Store(false) }

// Disable refuses new allocations with 403 Forbidden while existing sessions carry on
// until they end.
func (s *Server) Disable() { s.disabled.Store(true) }

// Enabled reports whether new allocations are accepted.
func (s *Server) Enabled() bool { return !s.disabled.Load() }

// Stats returns the relay's counters.
func (s *Server) Stats() Stats {
	st := Stats{
		Enabled:       s.Enabled(),
		SessionsTotal: s.sessionsTotal.Load(),
		Refused:       s.refused.Load(),
	}
	for i := range st.RefusedBy {
		st.RefusedBy[i] = s.refusedBy[i].Load()
	}
	s.mu.Lock()
	st.Sessions = s.sessions
	s.mu.Unlock()
	add := func(c *counters) {
		st.BytesToPeers += c.bytesToPeers.Load()
		st.BytesToClients += c.bytesToClients.Load()
		st.PacketsToPeers += c.pktsToPeers.Load()
		st.PacketsToClients += c.pktsToClients.Load()
		for i := range c.drops {
			st.Drops[i] += c.drops[i].Load()
		}
	}
	for _, l := range s.loops {
		add(&l.ctr)
	}
	add(&s.tcpCtr)
	return st
}

// sourceKey is a source as the limits count it: an IPv4 address or an IPv6 /64.
type sourceKey struct{ k0, k1 uint64 }

func sourceOf(ip netip.Addr) sourceKey {
	k0, k1 := ratelimit.Key(ip)
	return sourceKey{k0, k1}
}

// admit takes a session slot for user allocating from src, or returns the error to
// refuse with.
func (s *Server) admit(user string, src netip.Addr, now time.Time) (stun.ErrorCode, string) {
	if s.disabled.Load() {
		s.refuse(RefuseDisabled)
		return stun.CodeForbidden, "Forbidden: relay disabled"
	}
	sk := sourceOf(src)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return stun.CodeForbidden, "Forbidden: relay shutting down"
	case s.cfg.MaxSessions > 0 && s.sessions >= s.cfg.MaxSessions:
		s.refuse(RefuseMaxSessions)
		return stun.CodeAllocQuotaReached, "Allocation Quota Reached"
	case s.cfg.PerUserQuota > 0 && s.perUser[user] >= s.cfg.PerUserQuota:
		s.refuse(RefuseUserQuota)
		return stun.CodeAllocQuotaReached, "Allocation Quota Reached: user quota"
	case s.cfg.PerSourceQuota > 0 && s.perSource[sk] >= s.cfg.PerSourceQuota:
		s.refuse(RefuseSourceQuota)
		if s.mayLog(src, now) {
			// Under s.mu, but at most a few times a second.
			s.log.Warn("source at its allocation quota; further allocations refused with 486",
				"source", src, "quota", s.cfg.PerSourceQuota, "user", user, "refused_total", s.refusedBy[RefuseSourceQuota].Load())
		}
		return stun.CodeAllocQuotaReached, "Allocation Quota Reached: source quota"
	}
	s.sessions++
	s.perUser[user]++
	s.perSource[sk]++
	return 0, ""
}

func (s *Server) refuse(r RefuseReason) {
	s.refused.Add(1)
	s.refusedBy[r].Add(1)
}

func (s *Server) release(user string, src netip.Addr) {
	sk := sourceOf(src)
	s.mu.Lock()
	s.sessions--
	if s.perUser[user]--; s.perUser[user] <= 0 {
		delete(s.perUser, user)
	}
	if s.perSource[sk]--; s.perSource[sk] <= 0 {
		delete(s.perSource, sk)
	}
	s.mu.Unlock()
}

// limitLogEvery is how often at most the relay logs about one limited source.
const limitLogEvery = 5 * time.Second

// allowRequest charges a decoded request to its source's bucket. A request over the
// source's rate is counted and dropped: answering it would be the work the limit
// saves, and the client retransmits anyway.
func (s *Server) allowRequest(rc *reqCtx) bool {
	if s.requests == nil {
		return true
	}
	m := &rc.m
	unauth := m.Type.Method != stun.MethodBinding && !m.Contains(stun.AttrMessageIntegrity)
	cost := 1.0
	if unauth {
		cost = s.cfg.RequestLimit.UnauthenticatedCost
	}
	src := rc.client.Addr()
	now := int64(rc.now.Sub(s.epoch))
	if s.requests.Allow(src, cost, now) {
		return true
	}
	r := DropRateLimited
	if unauth {
		r = DropRateLimitedUnauth
	}
	if rc.loop != nil {
		rc.loop.drop(r)
	} else {
		s.tcpCtr.drops[r].Add(1)
	}
	if s.mayLog(src, rc.now) {
		s.log.Warn("source over its request rate; its requests are dropped", "source", src,
			"transport", rc.transport, "unauthenticated", unauth, "rate", s.cfg.RequestLimit.Rate, "burst", s.cfg.RequestLimit.Burst)
	}
	return false
}

// mayLog reports whether a line about src may be logged now: at most one a source
// every limitLogEvery, and a few a second over all sources.
func (s *Server) mayLog(src netip.Addr, now time.Time) bool {
	ns := int64(now.Sub(s.epoch))
	return s.logLimit.Allow(src, 1, ns) && s.logAll.Allow(netip.Addr{}, 1, ns)
}

// register hands a new allocation to a loop: the request's own for UDP clients, one
// picked by id for TCP and TLS clients.
func (s *Server) register(rc *reqCtx, a *allocation) bool {
	if rc.loop != nil {
		a.loop = rc.loop
		return rc.loop.addAlloc(a)
	}
	l := s.loops[int(a.id%uint64(len(s.loops)))]
	a.loop = l
	ok := false
	if !l.call(func() { ok = l.addAlloc(a) }) || !ok {
		return false
	}
	rc.tc.alloc.Store(a)
	return true
}

// deleteAlloc ends an allocation on its loop; onLoop is the loop the caller runs on, if
// any.
func (s *Server) deleteAlloc(onLoop *loop, a *allocation, reason string) {
	if a.loop == onLoop {
		onLoop.removeAlloc(a, reason)
		return
	}
	a.loop.post(func() { a.loop.removeAlloc(a, reason) })
}

// ended accounts for an allocation the loop has just removed.
func (s *Server) ended(a *allocation, reason string, now time.Time) {
	s.release(a.user, a.client.Addr())
	a.mu.Lock()
	started := a.started
	info := a.infoLocked()
	a.mu.Unlock()
	info.End, info.Reason = now, reason
	s.log.Debug("allocation ended", "id", a.id, "reason", reason, "bytes_in", info.BytesIn, "bytes_out", info.BytesOut)
	if started && s.cfg.OnSessionEnd != nil {
		s.hooks.push(func() { s.cfg.OnSessionEnd(info) })
	}
	if a.tc != nil {
		a.tc.allocationEnded(a, reason)
	}
}

func (rs *relaySock) closeUnregistered() {
	rs.mu.Lock()
	rs.closed = true
	unix.Close(rs.fd)
	rs.mu.Unlock()
}

func (s *Server) addReservation(token uint64, fd int, addr netip.AddrPort, expires time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		unix.Close(fd)
		return
	}
	s.reservations[token] = reservation{fd, addr, expires}
}

func (s *Server) claimReservation(token uint64, now time.Time) (reservation, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.reservations[token]
	if !ok {
		return r, false
	}
	delete(s.reservations, token)
	if !now.Before(r.expires) {
		unix.Close(r.fd)
		return r, false
	}
	return r, true
}

// sweep runs every second: expired reservations close here, and each loop sweeps its
// allocations.
func (s *Server) sweep() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	now := s.clock.Now()
	for tok, r := range s.reservations {
		if !now.Before(r.expires) {
			unix.Close(r.fd)
			delete(s.reservations, tok)
		}
	}
	s.sweepTimer = s.clock.AfterFunc(time.Second, s.sweep)
	s.mu.Unlock()
	for _, l := range s.loops {
		l.post(l.sweep)
	}
}

// endpoints are the addresses the relay registers: listen addresses, with the relay
// address in place of an unspecified host.
func (s *Server) endpoints() []Endpoint {
	host := func(ip netip.Addr) netip.Addr {
		if !ip.IsUnspecified() {
			return ip
		}
		if s.relayIP4.IsValid() {
			return s.relayIP4
		}
		return s.relayIP6
	}
	var eps []Endpoint
	seen := map[Endpoint]bool{}
	add := func(t Transport, ap netip.AddrPort) {
		e := Endpoint{t, netip.AddrPortFrom(host(ap.Addr().Unmap()), ap.Port()).String()}
		if !seen[e] {
			seen[e] = true
			eps = append(eps, e)
		}
	}
	for _, ap := range s.udpAddrs {
		add(UDP, ap)
	}
	for _, t := range []Transport{TCP, TLS} {
		if ap, ok := s.tcpAddrs[t]; ok {
			add(t, ap)
		}
	}
	return eps
}

// heartbeat registers the relay and reports its load until ctx ends.
func (s *Server) heartbeat(ctx context.Context) {
	reg := Registration{Endpoints: s.endpoints(), MaxSessions: s.cfg.MaxSessions, Capacity: s.cfg.TotalCapacity}
	registered := false
	t := time.NewTicker(s.cfg.HeartbeatInterval)
	defer t.Stop()
	var lastBytes uint64
	last := time.Now()
	for {
		if !registered {
			if err := s.cfg.Registrar.Register(ctx, reg); err != nil {
				if ctx.Err() != nil {
					return
				}
				s.log.Warn("relay registration failed", "err", err)
			} else {
				registered = true
			}
		}
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if !registered {
				continue
			}
			st := s.Stats()
			bytes := st.BytesToPeers + st.BytesToClients
			rate := float64(bytes-lastBytes) / now.Sub(last).Seconds()
			lastBytes, last = bytes, now
			err := s.cfg.Registrar.Heartbeat(ctx, Load{Enabled: st.Enabled, Sessions: st.Sessions, BytesPerSecond: rate})
			if err != nil && ctx.Err() == nil {
				s.log.Warn("relay heartbeat failed", "err", err)
			}
		}
	}
}

// hookQueue runs session hooks in order on one goroutine, so a slow hook never holds
// up relaying.
type hookQueue struct {
	mu     sync.Mutex
	q      []func()
	closed bool
	wake   chan struct{}
	done   chan struct{}
}

func newHookQueue() *hookQueue {
	h := &hookQueue{wake: make(chan struct{}, 1), done: make(chan struct{})}
	go h.run()
	return h
}

func (h *hookQueue) push(f func()) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	h.q = append(h.q, f)
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

func (h *hookQueue) run() {
	defer close(h.done)
	for {
		h.mu.Lock()
		q, closed := h.q, h.closed
		h.q = nil
		h.mu.Unlock()
		for _, f := range q {
			f()
		}
		if closed && len(q) == 0 {
			return
		}
		if len(q) == 0 {
			<-h.wake
		}
	}
}

// close runs the hooks already queued, then stops.
func (h *hookQueue) close() {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
	<-h.done
}
