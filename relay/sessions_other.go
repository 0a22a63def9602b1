//go:build !linux

package relay

// Sessions returns nil: the relay runs on Linux only.
func (s *Server) Sessions() []SessionInfo { return nil }
