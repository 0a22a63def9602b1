//go:build linux

package stun

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"

	pion "github.com/pion/stun/v3"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// fastPath reports whether this platform has the batched, SO_REUSEPORT UDP path.
const fastPath = true

// batchConn is the batched view of a UDP socket; ipv4 and ipv6 PacketConns both have it
// (their Message types are the same type).
type batchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

func newBatchConn(pc net.PacketConn, network string) batchConn {
	if _, ok := pc.(*net.UDPConn); !ok {
		return nil
	}
	if network == "udp4" {
		return ipv4.NewPacketConn(pc)
	}
	return ipv6.NewPacketConn(pc)
}

// reusePortConfig returns a ListenConfig that sets SO_REUSEPORT when share is true, so
// several sockets, each read by its own goroutine, split one address's traffic.
func reusePortConfig(share bool) net.ListenConfig {
	if !share {
		return net.ListenConfig{}
	}
	return net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
}

// batchLoop answers the datagrams of socket j of address i, many per system call, until
// the socket is closed.
func (s *Server) batchLoop(ctx context.Context, i, j int, in batchConn) {
	w := s.newWorker()
	msgs := make([]ipv4.Message, batchSize)
	bufs := make([]byte, batchSize*(maxMessageSize+1))
	resps := make([]*pion.Message, batchSize)
	for k := range msgs {
		msgs[k].Buffers = [][]byte{bufs[k*(maxMessageSize+1) : (k+1)*(maxMessageSize+1)]}
		resps[k] = newResponse()
	}
	// outs[f] are the answers to send from address f; their Buffers are preallocated so
	// that queuing an answer allocates nothing.
	var outs [4][]ipv4.Message
	for f := range outs {
		outs[f] = make([]ipv4.Message, batchSize)
		for k := range outs[f] {
			outs[f][k].Buffers = make([][]byte, 1)
		}
	}
	for {
		n, err := in.ReadBatch(msgs, 0)
		if err != nil {
			if s.readFailed(ctx, err) {
				return
			}
			continue
		}
		now := s.now()
		var nout [4]int
		for k := range n {
			m := &msgs[k]
			ua, ok := m.Addr.(*net.UDPAddr)
			if !ok {
				continue
			}
			if m.N > maxMessageSize || m.Flags&unix.MSG_TRUNC != 0 {
				w.c.add(cReceived)
				w.c.add(cNotSTUN)
				continue
			}
			src := ua.AddrPort()
			src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
			from, to, ok := w.handle(m.Buffers[0][:m.N], src, i, false, now, resps[k])
			if !ok {
				continue
			}
			o := &outs[from][nout[from]]
			nout[from]++
			o.Buffers[0] = resps[k].Raw
			o.Addr = m.Addr
			if to != src {
				o.Addr = net.UDPAddrFromAddrPort(to) // RESPONSE-PORT: rare, may allocate
			}
		}
		for f := range outs {
			if nout[f] > 0 {
				s.writeBatch(w, s.batch[f][j], outs[f][:nout[f]])
			}
		}
	}
}

// writeBatch sends ms, skipping any message the socket refuses.
func (s *Server) writeBatch(w *worker, out batchConn, ms []ipv4.Message) {
	for len(ms) > 0 {
		n, err := out.WriteBatch(ms, 0)
		if err != nil {
			// sendmmsg reports an error only for the first message it could not send.
			w.c.add(cSendFailed)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			n++
		} else if n == 0 {
			return
		}
		ms = ms[min(n, len(ms)):]
	}
}
