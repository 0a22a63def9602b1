//go:build !linux

package mux

import (
	"net"
	"net/netip"
)

// offload is segmentation offload, which only Linux has here.
type offload struct{ gro bool }

func newOffload(net.PacketConn) *offload { return nil }

func (o *offload) writeBatch([][]byte, netip.AddrPort) (bool, error) { return false, nil }

func (o *offload) read([]byte, []byte) (int, int, netip.AddrPort, error) {
	panic("mux: no offload")
}

func (m *Mux) segmenting() bool { return false }
