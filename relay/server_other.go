//go:build !linux

package relay

import (
	"context"
	"net/netip"
)

// Server is a TURN relay. It runs on Linux only: elsewhere Start returns
// ErrUnsupported, so programs that embed it still build.
type Server struct{ cfg Config }

// New checks cfg and returns a server that is not yet listening.
func New(cfg Config) (*Server, error) {
	if len(cfg.Users) == 0 && cfg.Secret == "" {
		return nil, ErrNoCredentials
	}
	return &Server{cfg: cfg}, nil
}

// Start returns ErrUnsupported.
func (s *Server) Start() error { return ErrUnsupported }

// ListenAndServe returns ErrUnsupported.
func (s *Server) ListenAndServe(context.Context) error { return ErrUnsupported }

// Close does nothing.
func (s *Server) Close() error { return nil }

// Addrs returns no addresses.
func (s *Server) Addrs() map[Transport][]netip.AddrPort { return nil }

// Enable does nothing.
func (s *Server) Enable() {}

// Disable does nothing.
func (s *Server) Disable() {}

// Enabled reports false.
func (s *Server) Enabled() bool { return false }

// Stats returns zero counters.
func (s *Server) Stats() Stats { return Stats{} }
