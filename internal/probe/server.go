package probe

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"peerlink/nettype"
)

// Endpoints are a probe server's two IPs and two ports. The server listens on all four
// combinations.
type Endpoints struct {
	Primary, Alternate netip.Addr
	Port, AltPort      uint16
}

// Addr returns the primary endpoint, moved to the other IP and/or the other port.
func (e Endpoints) Addr(changeIP, changePort bool) netip.AddrPort {
	ip, port := e.Primary, e.Port
	if changeIP {
		ip = e.Alternate
	}
	if changePort {
		port = e.AltPort
	}
	return netip.AddrPortFrom(ip, port)
}

// other returns the endpoint that answers a request sent to at with the given changes.
func (e Endpoints) other(at netip.AddrPort, changeIP, changePort bool) netip.AddrPort {
	ip, port := at.Addr(), at.Port()
	if changeIP {
		if ip == e.Primary {
			ip = e.Alternate
		} else {
			ip = e.Primary
		}
	}
	if changePort {
		if port == e.Port {
			port = e.AltPort
		} else {
			port = e.Port
		}
	}
	return netip.AddrPortFrom(ip, port)
}

func (e Endpoints) String() string {
	return fmt.Sprintf("%s|%s ports %d|%d", e.Primary, e.Alternate, e.Port, e.AltPort)
}

// ServerConfig configures a probe server.
type ServerConfig struct {
	// Listener opens the server's sockets; nil means the host's network.
	Listener nettype.PacketListener
	// Endpoints are the addresses to serve. Both IPs are required; a zero port picks a
	// free one (the same number on both IPs).
	Endpoints Endpoints
	// Logger receives errors; nil means quiet.
	Logger *slog.Logger
}

// Server answers probe requests on four sockets. It answers only well-formed requests,
// only to their source, and never with more bytes than the request had.
type Server struct {
	ep     Endpoints
	conns  map[netip.AddrPort]net.PacketConn
	log    *slog.Logger
	wg     sync.WaitGroup
	closed sync.Once
	err    error
}

// ErrNoAlternate is returned when a server is configured without a second IP.
var ErrNoAlternate = errors.New("probe: server needs two IP addresses")

// Listen opens the four sockets and starts answering. Close stops it.
func Listen(ctx context.Context, cfg ServerConfig) (*Server, error) {
	ep := cfg.Endpoints
	if !ep.Primary.IsValid() || !ep.Alternate.IsValid() || ep.Primary == ep.Alternate {
		return nil, ErrNoAlternate
	}
	s := &Server{conns: make(map[netip.AddrPort]net.PacketConn), log: cfg.Logger}
	l := nettype.Or(cfg.Listener)
	var err error
	if ep.Port, err = s.listenPair(ctx, l, ep, ep.Port); err != nil {
		s.closeConns()
		return nil, err
	}
	if ep.AltPort, err = s.listenPair(ctx, l, ep, ep.AltPort); err != nil {
		s.closeConns()
		return nil, err
	}
	s.ep = ep
	for at, c := range s.conns {
		s.wg.Add(1)
		go s.serve(at, c)
	}
	return s, nil
}

// listenPair binds port (or a free one when zero) on both IPs.
func (s *Server) listenPair(ctx context.Context, l nettype.PacketListener, ep Endpoints, port uint16) (uint16, error) {
	network := "udp4"
	if ep.Primary.Is6() {
		network = "udp6"
	}
	tries := 1
	if port == 0 {
		tries = 20
	}
	var lastErr error
	for range tries {
		c1, err := l.ListenPacket(ctx, network, netip.AddrPortFrom(ep.Primary, port).String())
		if err != nil {
			return 0, fmt.Errorf("probe: listen: %w", err)
		}
		a1, ok := addrPortOf(c1.LocalAddr())
		if !ok {
			c1.Close()
			return 0, fmt.Errorf("probe: listener returned address %v", c1.LocalAddr())
		}
		p := a1.Port()
		c2, err := l.ListenPacket(ctx, network, netip.AddrPortFrom(ep.Alternate, p).String())
		if err != nil {
			c1.Close()
			lastErr = err
			continue // the number is taken on the other IP; try another
		}
		s.conns[netip.AddrPortFrom(ep.Primary, p)] = c1
		s.conns[netip.AddrPortFrom(ep.Alternate, p)] = c2
		return p, nil
	}
	return 0, fmt.Errorf("probe: listen on both IPs: %w", lastErr)
}

// Endpoints returns the addresses the server answers on, with the ports it bound.
func (s *Server) Endpoints() Endpoints { return s.ep }

func (s *Server) serve(at netip.AddrPort, c net.PacketConn) {
	defer s.wg.Done()
	buf := make([]byte, 2048)
	out := make([]byte, 0, maxResponseLen)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && s.log != nil {
				s.log.Warn("probe server read", "addr", at, "err", err)
			}
			return
		}
		m, err := Parse(buf[:n])
		if err != nil || m.Response {
			continue
		}
		src, ok := addrPortOf(from)
		if !ok {
			continue
		}
		answerAt := s.ep.other(at, m.ChangeIP, m.ChangePort)
		ac := s.conns[answerAt]
		if ac == nil {
			continue
		}
		resp := Message{Response: true, ChangeIP: m.ChangeIP, ChangePort: m.ChangePort, TxID: m.TxID, Observed: src, Origin: answerAt}
		out = resp.Append(out[:0])
		if _, err := ac.WriteTo(out, from); err != nil && s.log != nil && !errors.Is(err, net.ErrClosed) {
			s.log.Debug("probe server write", "to", src, "err", err)
		}
	}
}

// Close stops the server and waits for its goroutines. It is safe to call more than once.
func (s *Server) Close() error {
	s.closed.Do(func() {
		s.err = s.closeConns()
		s.wg.Wait()
	})
	return s.err
}

func (s *Server) closeConns() error {
	var errs []error
	for _, c := range s.conns {
		if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// addrPortOf converts a net.Addr from a PacketConn into a netip.AddrPort.
func addrPortOf(a net.Addr) (netip.AddrPort, bool) {
	switch a := a.(type) {
	case *net.UDPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), ap.IsValid()
	case interface{ AddrPort() netip.AddrPort }:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), ap.IsValid()
	}
	if a == nil {
		return netip.AddrPort{}, false
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
}
