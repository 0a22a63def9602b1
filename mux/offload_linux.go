package mux

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// offload is a UDP socket's segmentation offload: with GSO (UDP_SEGMENT) a run of
// equal-sized datagrams to one address leaves in one system call and travels the
// host's stack, its veths and NATs as one packet until something segments it; with
// GRO (UDP_GRO) the kernel hands such runs up the same way. Per-datagram system calls
// are what bound a node's throughput, so both matter for bulk traffic.
type offload struct {
	uc  *net.UDPConn
	gso atomic.Bool // cleared when the kernel refuses a segmented send
	gro bool
}

// Limits of one segmented send: the kernel's UDP_MAX_SEGMENTS (64 on older kernels)
// and what fits in one IP datagram.
const (
	maxSegments = 64
	maxGSOBytes = 65000
)

var gsoBufs = sync.Pool{New: func() any { b := make([]byte, 0, maxGSOBytes); return &b }}

// newOffload returns c's offload, or nil when c is not a UDP socket (an emulated
// network's). A wrapper that has Unwrap() net.PacketConn is looked through.
func newOffload(c net.PacketConn) *offload {
	for {
		w, ok := c.(interface{ Unwrap() net.PacketConn })
		if !ok {
			break
		}
		c = w.Unwrap()
	}
	uc, ok := c.(*net.UDPConn)
	if !ok {
		return nil
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil
	}
	o := &offload{uc: uc}
	rc.Control(func(fd uintptr) {
		if _, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT); err == nil {
			o.gso.Store(true)
		}
		o.gro = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
	})
	return o
}

// writeBatch sends bufs to to, segmented where it can. It returns false when it did
// not send (no GSO), leaving it to the caller.
func (o *offload) writeBatch(bufs [][]byte, to netip.AddrPort) (bool, error) {
	if o == nil || !o.gso.Load() || len(bufs) < 2 {
		return false, nil
	}
	for i := 0; i < len(bufs); {
		seg := len(bufs[i])
		j, total := i+1, seg
		for j < len(bufs) && j-i < maxSegments && total+len(bufs[j]) <= maxGSOBytes && len(bufs[j]) <= seg && seg > 0 {
			total += len(bufs[j])
			j++
			if len(bufs[j-1]) < seg {
				break // a shorter datagram ends a run
			}
		}
		var err error
		if j-i == 1 {
			_, err = o.uc.WriteToUDPAddrPort(bufs[i], to)
		} else {
			err = o.writeSegments(bufs[i:j], seg, to)
			if errors.Is(err, syscall.EIO) || errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP) {
				// No checksum offload on the route's device, or an old kernel: send
				// datagram by datagram from now on.
				o.gso.Store(false)
				for _, b := range bufs[i:] {
					if _, err := o.uc.WriteToUDPAddrPort(b, to); err != nil {
						return true, err
					}
				}
				return true, nil
			}
		}
		if err != nil {
			return true, err
		}
		i = j
	}
	return true, nil
}

func (o *offload) writeSegments(bufs [][]byte, seg int, to netip.AddrPort) error {
	if b, ok := contiguous(bufs); ok {
		return o.writeSegmented(b, seg, to)
	}
	bp := gsoBufs.Get().(*[]byte)
	b := (*bp)[:0]
	for _, p := range bufs {
		b = append(b, p...)
	}
	err := o.writeSegmented(b, seg, to)
	*bp = b
	gsoBufs.Put(bp)
	return err
}

// contiguous returns bufs as one slice when each starts where the one before ends in
// the same array (as connect lays out its frames).
func contiguous(bufs [][]byte) ([]byte, bool) {
	first := bufs[0]
	n := len(first)
	for _, p := range bufs[1:] {
		if len(p) == 0 || cap(first) < n+len(p) || unsafe.SliceData(p) != unsafe.SliceData(first[n:n+1]) {
			return nil, false
		}
		n += len(p)
	}
	return first[:n], true
}

func (o *offload) writeSegmented(b []byte, seg int, to netip.AddrPort) error {
	var oob [unix.SizeofCmsghdr + 8]byte
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(seg))
	_, _, err := o.uc.WriteMsgUDPAddrPort(b, oob[:unix.CmsgSpace(2)], to)
	return err
}

// read reads one datagram, or one GRO run of them; seg is the run's segment size (0
// for a single datagram).
func (o *offload) read(buf, oob []byte) (n, seg int, from netip.AddrPort, err error) {
	n, oobn, _, from, err := o.uc.ReadMsgUDPAddrPort(buf, oob)
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	if err != nil || oobn == 0 {
		return n, 0, from, err
	}
	msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
	if perr != nil {
		return n, 0, from, nil
	}
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_UDP && m.Header.Type == unix.UDP_GRO && len(m.Data) >= 4 {
			seg = int(binary.NativeEndian.Uint32(m.Data))
		}
	}
	return n, seg, from, nil
}

// segmenting reports whether m sends batches segmented (for tests).
func (m *Mux) segmenting() bool { return m.off != nil && m.off.gso.Load() }
