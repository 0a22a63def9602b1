package stun

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	pion "github.com/pion/stun/v3"

	"peerlink/clock"
	"peerlink/nettype"
)

// Config configures a Server. The zero value serves RFC 8489 Binding on UDP port 3478 of
// every address, rate-limited, without RFC 5780.
type Config struct {
	// Listen is the primary UDP address, "host:port". Empty means ":3478". The host may
	// be empty (every address) unless AltIP is set.
	Listen string
	// AltIP turns on RFC 5780 NAT behaviour discovery: the server listens on Listen's IP
	// and AltIP, each with the primary and the alternate port, answers CHANGE-REQUEST
	// from the right one of those four sockets and adds OTHER-ADDRESS and
	// RESPONSE-ORIGIN. It must be of the same family as Listen's IP. The zero Addr means
	// one address, where CHANGE-REQUEST is answered with 420 as RFC 5780 says.
	AltIP netip.Addr
	// AltPort is the alternate port. Zero means Listen's port plus one, or a port free on
	// both IPs when Listen's port is 0. Ignored without AltIP.
	AltPort uint16
	// TCP also serves Binding over TCP on the primary address. Answers over TCP carry no
	// RFC 5780 attributes: they can only come back on their connection.
	TCP bool
	// MaxTCPConns bounds open TCP connections; 0 means 1024.
	MaxTCPConns int
	// TCPIdleTimeout closes TCP connections idle that long; 0 means 30s.
	TCPIdleTimeout time.Duration
	// Software is sent as the SOFTWARE attribute of every answer; empty sends none.
	// At most 128 bytes.
	Software string
	// RateLimit bounds what each source can get; its zero value is a sane default.
	RateLimit RateLimit
	// SocketsPerAddr is the number of SO_REUSEPORT sockets, each with its own reader,
	// per address on Linux when Net is nil; 0 means GOMAXPROCS. Otherwise there is one.
	SocketsPerAddr int
	// Net opens the UDP sockets; nil means the host's network, where on Linux the server
	// reads and writes in batches (recvmmsg, sendmmsg) on SO_REUSEPORT sockets. Other
	// networks get a plain ReadFrom loop. If Net also has a method
	// Listen(ctx, network, address string) (net.Listener, error) it opens the TCP
	// listener; otherwise TCP needs Net to be nil.
	Net nettype.PacketListener
	// Logger gets startup and error messages; nil means quiet.
	Logger *slog.Logger
	// Clock drives the rate limiter; nil means the real clock.
	Clock clock.Clock
}

const (
	defaultListen      = ":3478"
	defaultMaxTCPConns = 1024
	defaultTCPIdle     = 30 * time.Second
	maxSoftware        = 128
	// batchSize is the number of datagrams one recvmmsg or sendmmsg moves.
	batchSize = 64
	// socketBuffer is the receive buffer asked for each UDP socket.
	socketBuffer = 4 << 20
)

// streamListener is what Config.Net needs for TCP.
type streamListener interface {
	Listen(ctx context.Context, network, address string) (net.Listener, error)
}

// Server is a STUN server. It answers RFC 8489 Binding requests over UDP and TCP, does
// RFC 5780 NAT behaviour discovery when it has a second IP, and gives RFC 3489 clients
// (no magic cookie) the MAPPED-ADDRESS, SOURCE-ADDRESS and CHANGED-ADDRESS they expect.
// Listen opens its sockets, Serve answers on them, Close stops it.
type Server struct {
	cfg   Config
	log   *slog.Logger
	clock clock.Clock
	epoch time.Time
	h     handler

	// conns[i] are the sockets of address i (see ChangeRequest.socket); batch[i] their
	// batched views, nil where the plain loop runs.
	conns [4][]net.PacketConn
	batch [4][]batchConn
	tcp   net.Listener

	counters    counterSet
	tcpCounters *counters

	mu       sync.Mutex
	closed   bool
	serving  bool
	cancel   context.CancelFunc
	served   chan struct{}
	tcpConns map[net.Conn]struct{}
	wg       sync.WaitGroup
	shutOnce sync.Once
}

// Listen checks cfg and opens the server's sockets. The server answers nothing until
// Serve.
func Listen(ctx context.Context, cfg Config) (*Server, error) {
	s := &Server{
		cfg:      cfg,
		log:      cfg.Logger,
		clock:    clock.Or(cfg.Clock),
		served:   make(chan struct{}),
		tcpConns: make(map[net.Conn]struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.cfg.Listen == "" {
		s.cfg.Listen = defaultListen
	}
	if s.cfg.MaxTCPConns <= 0 {
		s.cfg.MaxTCPConns = defaultMaxTCPConns
	}
	if s.cfg.TCPIdleTimeout <= 0 {
		s.cfg.TCPIdleTimeout = defaultTCPIdle
	}
	if len(cfg.Software) > maxSoftware {
		return nil, fmt.Errorf("%w: Software is %d bytes, more than %d", ErrConfig, len(cfg.Software), maxSoftware)
	}
	ip, port, err := splitListen(ctx, s.cfg.Listen)
	if err != nil {
		return nil, err
	}
	rfc5780 := cfg.AltIP.IsValid()
	if rfc5780 {
		alt := cfg.AltIP.Unmap()
		switch {
		case !ip.IsValid() || ip.IsUnspecified():
			return nil, fmt.Errorf("%w: AltIP needs a specific IP in Listen, not %q", ErrConfig, s.cfg.Listen)
		case alt.Is4() != ip.Is4():
			return nil, fmt.Errorf("%w: AltIP %v and Listen IP %v are of different families", ErrConfig, alt, ip)
		case alt == ip || alt.IsUnspecified():
			return nil, fmt.Errorf("%w: AltIP %v must be a second, specific address", ErrConfig, alt)
		case port == 65535 && cfg.AltPort == 0:
			return nil, fmt.Errorf("%w: no alternate port after 65535; set AltPort", ErrConfig)
		case port != 0 && cfg.AltPort == port:
			return nil, fmt.Errorf("%w: AltPort must differ from the primary port", ErrConfig)
		}
		s.cfg.AltIP = alt
	}
	if cfg.TCP && cfg.Net != nil {
		if _, ok := cfg.Net.(streamListener); !ok {
			return nil, fmt.Errorf("%w: TCP needs the host network or a Net with a Listen method", ErrConfig)
		}
	}

	if err := s.bind(ctx, ip, port); err != nil {
		s.closeSockets()
		return nil, err
	}
	s.setupHandler()
	s.epoch = s.clock.Now()
	s.tcpCounters = s.counters.new()
	s.log.Info("stun: listening", "udp", s.UDPAddr(0), "rfc5780", rfc5780,
		"alt", s.UDPAddr(ChangeIP|ChangePort), "tcp", s.TCPAddr(), "sockets", len(s.conns[0]))
	return s, nil
}

// splitListen resolves a Listen address. An empty host gives the zero Addr.
func splitListen(ctx context.Context, listen string) (netip.Addr, uint16, error) {
	host, p, err := net.SplitHostPort(listen)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("%w: Listen %q: %v", ErrConfig, listen, err)
	}
	port, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("%w: Listen %q: bad port", ErrConfig, listen)
	}
	if host == "" {
		return netip.Addr{}, uint16(port), nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		ips, lerr := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		if lerr != nil || len(ips) == 0 {
			return netip.Addr{}, 0, fmt.Errorf("%w: Listen %q: %v", ErrConfig, listen, lerr)
		}
		ip = ips[0]
	}
	return ip.Unmap(), uint16(port), nil
}

// bind opens every socket. Ports chosen by the system must also be free on the other
// IP, so it retries when that fails.
func (s *Server) bind(ctx context.Context, ip netip.Addr, port uint16) error {
	tries := 1
	if port == 0 {
		tries = 20
	}
	var err error
	for range tries {
		if err = s.tryBind(ctx, ip, port); err == nil {
			return nil
		}
		s.closeSockets()
		s.conns = [4][]net.PacketConn{}
		s.batch = [4][]batchConn{}
		s.tcp = nil
	}
	return err
}

func (s *Server) tryBind(ctx context.Context, ip netip.Addr, port uint16) error {
	network := "udp"
	host := ""
	if ip.IsValid() {
		host = ip.String()
		if ip.Is4() {
			network = "udp4"
		} else {
			network = "udp6"
		}
	}
	n := 1
	var lc net.ListenConfig
	fast := s.cfg.Net == nil && fastPath
	if fast {
		n = s.cfg.SocketsPerAddr
		if n <= 0 {
			n = runtime.GOMAXPROCS(0)
		}
		lc = reusePortConfig(n > 1)
	}
	listen := func(i int, host string, port uint16) (uint16, error) {
		if port == 0 && n > 1 {
			// The kernel may hand a SO_REUSEPORT socket asking for any port one that
			// another SO_REUSEPORT socket of this user holds, joining the two. A port
			// picked without the option is free.
			probe, err := net.ListenPacket(network, net.JoinHostPort(host, "0"))
			if err != nil {
				return 0, err
			}
			ap, err := addrPortOf(probe.LocalAddr())
			probe.Close()
			if err != nil {
				return 0, err
			}
			port = ap.Port()
		}
		addr := net.JoinHostPort(host, strconv.Itoa(int(port)))
		for j := range n {
			var pc net.PacketConn
			var err error
			if s.cfg.Net != nil {
				pc, err = s.cfg.Net.ListenPacket(ctx, network, addr)
			} else {
				pc, err = lc.ListenPacket(ctx, network, addr)
			}
			if err != nil {
				return 0, err
			}
			s.conns[i] = append(s.conns[i], pc)
			var bc batchConn
			if fast {
				bc = newBatchConn(pc, network)
				// Room for bursts while a reader waits for a CPU; the kernel caps it
				// at net.core.rmem_max.
				if u, ok := pc.(*net.UDPConn); ok {
					u.SetReadBuffer(socketBuffer)
				}
			}
			s.batch[i] = append(s.batch[i], bc)
			if j == 0 {
				got, err := addrPortOf(pc.LocalAddr())
				if err != nil {
					return 0, err
				}
				port = got.Port()
				addr = net.JoinHostPort(host, strconv.Itoa(int(port)))
			}
		}
		return port, nil
	}
	p1, err := listen(0, host, port)
	if err != nil {
		return err
	}
	if s.cfg.AltIP.IsValid() {
		p2 := s.cfg.AltPort
		if p2 == 0 && port != 0 {
			p2 = port + 1
		}
		if p2, err = listen(1, host, p2); err != nil {
			return err
		}
		if p2 == p1 {
			return fmt.Errorf("%w: alternate port %d is the primary port", ErrConfig, p2)
		}
		alt := s.cfg.AltIP.String()
		if _, err = listen(2, alt, p1); err != nil {
			return err
		}
		if _, err = listen(3, alt, p2); err != nil {
			return err
		}
	}
	if s.cfg.TCP {
		tnet := strings.Replace(network, "udp", "tcp", 1)
		taddr := net.JoinHostPort(host, strconv.Itoa(int(p1)))
		if sl, ok := s.cfg.Net.(streamListener); ok {
			s.tcp, err = sl.Listen(ctx, tnet, taddr)
		} else {
			var tlc net.ListenConfig
			s.tcp, err = tlc.Listen(ctx, tnet, taddr)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func addrPortOf(a net.Addr) (netip.AddrPort, error) {
	switch a := a.(type) {
	case *net.UDPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return ap, fmt.Errorf("stun: unusable address %v: %w", a, err)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func (s *Server) setupHandler() {
	var addrs [4]netip.AddrPort
	for i := range s.conns {
		if len(s.conns[i]) > 0 {
			addrs[i], _ = addrPortOf(s.conns[i][0].LocalAddr())
		}
	}
	s.h.init(addrs, s.cfg.AltIP.IsValid(), s.cfg.Software, s.cfg.RateLimit)
}

// UDPAddr returns the address of the UDP socket that answers a CHANGE-REQUEST with flags
// c sent to the primary address: UDPAddr(0) is the primary address, UDPAddr(ChangeIP)
// the alternate IP with the primary port, UDPAddr(ChangePort) the primary IP with the
// alternate port and UDPAddr(ChangeIP|ChangePort), the OTHER-ADDRESS, both alternates.
// Without RFC 5780 only UDPAddr(0) is valid; the others are the zero AddrPort.
func (s *Server) UDPAddr(c ChangeRequest) netip.AddrPort { return s.h.addrs[c.socket()] }

// TCPAddr returns the TCP listener's address, or the zero AddrPort without TCP.
func (s *Server) TCPAddr() netip.AddrPort {
	if s.tcp == nil {
		return netip.AddrPort{}
	}
	ap, _ := addrPortOf(s.tcp.Addr())
	return ap
}

// RFC5780 reports whether the server has an alternate address.
func (s *Server) RFC5780() bool { return s.h.rfc5780 }

// Stats returns the counters so far.
func (s *Server) Stats() Stats { return s.counters.stats() }

// Serve answers requests until ctx is done or Close is called, then closes the sockets
// and returns nil once every goroutine it started has ended. It returns ErrServerClosed
// if the server was closed before, and an error if called twice.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	if s.serving {
		s.mu.Unlock()
		return errors.New("stun: Serve called twice")
	}
	s.serving = true
	ctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	s.mu.Unlock()
	defer close(s.served)
	defer cancel()

	for i := range s.conns {
		for j := range s.conns[i] {
			s.wg.Go(func() { s.readLoop(ctx, i, j) })
		}
	}
	if s.tcp != nil {
		s.wg.Go(func() { s.acceptLoop(ctx) })
	}
	<-ctx.Done()
	s.shutdown()
	s.wg.Wait()
	return nil
}

// Close stops Serve, closes every socket and waits for the server's goroutines. It is
// safe to call more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	cancel, serving := s.cancel, s.serving
	s.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	s.shutdown()
	if serving {
		<-s.served
	}
	return nil
}

// shutdown marks the server closed and closes every socket and TCP connection, which
// ends the loops reading them. It runs once.
func (s *Server) shutdown() {
	s.shutOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		for c := range s.tcpConns {
			c.Close()
		}
		s.mu.Unlock()
		s.closeSockets()
	})
}

// closeSockets closes the UDP sockets and the TCP listener.
func (s *Server) closeSockets() {
	for i := range s.conns {
		for _, c := range s.conns[i] {
			c.Close()
		}
	}
	if s.tcp != nil {
		s.tcp.Close()
	}
}

func (s *Server) now() int64 { return int64(s.clock.Now().Sub(s.epoch)) }

func (s *Server) newWorker() *worker {
	return &worker{h: &s.h, c: s.counters.new()}
}

func newResponse() *pion.Message {
	m := pion.New()
	m.Raw = make([]byte, 0, responseCap)
	m.Attributes = make(pion.Attributes, 0, 8)
	return m
}

// readLoop answers the datagrams of socket j of address i until it is closed.
func (s *Server) readLoop(ctx context.Context, i, j int) {
	if bc := s.batch[i][j]; bc != nil {
		s.batchLoop(ctx, i, j, bc)
		return
	}
	pc := s.conns[i][j]
	w := s.newWorker()
	buf := make([]byte, maxMessageSize+1)
	resp := newResponse()
	udp, _ := pc.(*net.UDPConn)
	for {
		var (
			n    int
			src  netip.AddrPort
			addr net.Addr
			err  error
		)
		if udp != nil {
			n, src, err = udp.ReadFromUDPAddrPort(buf)
		} else if n, addr, err = pc.ReadFrom(buf); err == nil {
			src, err = addrPortOf(addr)
		}
		if err != nil {
			if s.readFailed(ctx, err) {
				return
			}
			continue
		}
		if n > maxMessageSize {
			w.c.add(cReceived)
			w.c.add(cNotSTUN)
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		from, to, ok := w.handle(buf[:n], src, i, false, s.now(), resp)
		if !ok {
			continue
		}
		out := s.conns[from][j]
		if u, ok := out.(*net.UDPConn); ok {
			_, err = u.WriteToUDPAddrPort(resp.Raw, to)
		} else {
			if addr == nil || to != src {
				addr = net.UDPAddrFromAddrPort(to)
			}
			_, err = out.WriteTo(resp.Raw, addr)
		}
		if err != nil {
			w.c.add(cSendFailed)
		}
	}
}

// readFailed reports whether a read error ends the loop.
func (s *Server) readFailed(ctx context.Context, err error) bool {
	if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
		return true
	}
	s.log.Debug("stun: read", "err", err)
	return false
}
