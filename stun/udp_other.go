//go:build !linux

package stun

import (
	"context"
	"net"
)

// fastPath reports whether this platform has the batched, SO_REUSEPORT UDP path.
const fastPath = false

type batchConn interface{}

func newBatchConn(net.PacketConn, string) batchConn { return nil }

func reusePortConfig(bool) net.ListenConfig { return net.ListenConfig{} }

func (s *Server) batchLoop(context.Context, int, int, batchConn) {}
