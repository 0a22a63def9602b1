// Package nettype defines the small network interfaces peerlink components take, so the
// same code runs on real sockets and on natlab's emulated network.
package nettype

import (
	"context"
	"net"
)

// PacketListener opens packet sockets. Every peerlink component that sends UDP takes one,
// so tests can substitute an emulated network for the kernel's.
type PacketListener interface {
	// ListenPacket is net.ListenConfig.ListenPacket: network is "udp", "udp4" or "udp6"
	// and address a host:port to bind ("0.0.0.0:0" and ":0" pick any).
	ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error)
}

// Std is the host's real network.
type Std struct {
	// Config is used for every socket; its zero value is the standard library default.
	Config net.ListenConfig
}

// ListenPacket opens a real socket.
func (s Std) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	return s.Config.ListenPacket(ctx, network, address)
}

// Listen opens a real stream listener.
func (s Std) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	return s.Config.Listen(ctx, network, address)
}

// Or returns l, or the real network when l is nil, so a nil field in a config means "the
// host's network".
func Or(l PacketListener) PacketListener {
	if l == nil {
		return Std{}
	}
	return l
}
