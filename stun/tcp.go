package stun

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"
)

// acceptLoop accepts TCP connections until the listener is closed.
func (s *Server) acceptLoop(ctx context.Context) {
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return
			}
			// Out of descriptors and the like: give the system a moment.
			s.log.Warn("stun: tcp accept", "err", err)
			t := time.NewTimer(50 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		if !s.trackConn(c) {
			s.tcpCounters.add(cTCPLimit)
			c.Close()
			continue
		}
		s.wg.Go(func() { s.serveConn(c) })
	}
}

func (s *Server) trackConn(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || len(s.tcpConns) >= s.cfg.MaxTCPConns {
		return false
	}
	s.tcpConns[c] = struct{}{}
	return true
}

// serveConn answers the requests of one TCP connection until it closes, idles out or
// sends something that is not STUN.
func (s *Server) serveConn(c net.Conn) {
	defer func() {
		s.mu.Lock()
		delete(s.tcpConns, c)
		s.mu.Unlock()
		c.Close()
	}()
	src, err := addrPortOf(c.RemoteAddr())
	if err != nil {
		return
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	w := &worker{h: &s.h, c: s.tcpCounters}
	buf := make([]byte, maxMessageSize)
	resp := newResponse()
	for {
		c.SetReadDeadline(time.Now().Add(s.cfg.TCPIdleTimeout))
		msg, err := ReadMessage(c, buf)
		if err != nil {
			if errors.Is(err, ErrNotSTUN) {
				w.c.add(cReceived)
				w.c.add(cNotSTUN)
			}
			return
		}
		if _, _, ok := w.handle(msg, src, 0, true, s.now(), resp); !ok {
			continue
		}
		c.SetWriteDeadline(time.Now().Add(s.cfg.TCPIdleTimeout))
		if _, err := c.Write(resp.Raw); err != nil {
			w.c.add(cSendFailed)
			return
		}
	}
}
