package relay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Raw, non-blocking UDP sockets for the event loops. The loops poll them with their own
// epoll sets, so they stay out of the Go runtime's poller; every fd is closed only by
// the loop that polls it (or, before it is handed to a loop, by its creator).

// sockaddr is a raw sockaddr_in or sockaddr_in6, built once per address so sends do not
// convert addresses.
type sockaddr struct {
	b [unix.SizeofSockaddrInet6]byte
	n uint32
}

// sockaddrOf encodes ap for a socket of the given family (IPv4 addresses become
// v4-mapped on IPv6 sockets).
func sockaddrOf(k addrKey, v6 bool) sockaddr {
	var sa sockaddr
	if !v6 {
		binary.NativeEndian.PutUint16(sa.b[0:], unix.AF_INET)
		binary.BigEndian.PutUint16(sa.b[2:], k.port)
		copy(sa.b[4:8], k.ip[12:])
		sa.n = unix.SizeofSockaddrInet4
		return sa
	}
	binary.NativeEndian.PutUint16(sa.b[0:], unix.AF_INET6)
	binary.BigEndian.PutUint16(sa.b[2:], k.port)
	copy(sa.b[8:24], k.ip[:])
	sa.n = unix.SizeofSockaddrInet6
	return sa
}

// keyFromRaw decodes the sockaddr the kernel wrote into b.
func keyFromRaw(b *[unix.SizeofSockaddrInet6]byte) addrKey {
	var k addrKey
	k.port = binary.BigEndian.Uint16(b[2:])
	if binary.NativeEndian.Uint16(b[0:]) == unix.AF_INET {
		k.ip[10], k.ip[11] = 0xff, 0xff
		copy(k.ip[12:], b[4:8])
		return k
	}
	copy(k.ip[:], b[8:24])
	return k
}

func toUnixSockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

// udpSocket opens a non-blocking UDP socket bound to ap and returns it with its bound
// address.
func udpSocket(ap netip.AddrPort, reusePort bool, bufSize int) (int, netip.AddrPort, error) {
	family := unix.AF_INET
	if !ap.Addr().Is4() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return -1, netip.AddrPort{}, fmt.Errorf("socket: %w", err)
	}
	fail := func(what string, err error) (int, netip.AddrPort, error) {
		unix.Close(fd)
		return -1, netip.AddrPort{}, fmt.Errorf("%s %v: %w", what, ap, err)
	}
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return fail("IPV6_V6ONLY", err)
		}
	}
	if reusePort {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fail("SO_REUSEPORT", err)
		}
	}
	if bufSize > 0 {
		// Best effort: the kernel caps these at rmem_max and wmem_max.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, bufSize)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, bufSize)
	}
	if err := unix.Bind(fd, toUnixSockaddr(ap)); err != nil {
		return fail("bind", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fail("getsockname", err)
	}
	var bound netip.AddrPort
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		bound = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		bound = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return fd, bound, nil
}

// setDontFragment makes the kernel send with DF and never fragment (RFC 8656
// DONT-FRAGMENT).
func setDontFragment(fd int, v6 bool) error {
	if v6 {
		return unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_DO)
	}
	return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
}

var errNoPort = errors.New("no free relay port")

// relaySockBuf is a relayed socket's kernel buffer limit: enough for a burst to ride out
// a scheduling delay. It is a limit, not an allocation: idle sockets cost nothing.
const relaySockBuf = 512 << 10

// portRange picks relay ports.
type portRange struct{ min, max uint16 }

// bindRelay opens a relay socket on ip: in [min, max] when a range is set, else on a
// kernel-chosen port. With even, the port is even, and with reserve the next port is
// bound too and returned as a second socket (RFC 8656 EVEN-PORT with R set).
func (pr portRange) bindRelay(ip netip.Addr, even, reserve bool) (fd int, addr netip.AddrPort, rfd int, raddr netip.AddrPort, err error) {
	const tries = 64
	for range tries {
		var port uint16
		if pr.min != 0 {
			port = pr.min + uint16(rand.IntN(int(pr.max-pr.min)+1))
			if even {
				port &^= 1
				if port < pr.min {
					port += 2
				}
			}
			if reserve && (port == 0xFFFF || port+1 > pr.max) {
				continue
			}
		}
		fd, addr, err = udpSocket(netip.AddrPortFrom(ip, port), false, relaySockBuf)
		if err != nil {
			if pr.min != 0 && errors.Is(err, unix.EADDRINUSE) {
				continue
			}
			return -1, addr, -1, raddr, err
		}
		if even && addr.Port()%2 != 0 || reserve && addr.Port() == 0xFFFF {
			unix.Close(fd)
			continue
		}
		if !reserve {
			return fd, addr, -1, raddr, nil
		}
		rfd, raddr, err = udpSocket(netip.AddrPortFrom(ip, addr.Port()+1), false, relaySockBuf)
		if err != nil {
			unix.Close(fd)
			continue
		}
		return fd, addr, rfd, raddr, nil
	}
	return -1, addr, -1, raddr, errNoPort
}

// mmsgs is a batch of message headers for recvmmsg or sendmmsg.
type mmsgs struct {
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names [][unix.SizeofSockaddrInet6]byte
}

func newMmsgs(n int) *mmsgs {
	m := &mmsgs{
		hdrs:  make([]unix.Mmsghdr, n),
		iovs:  make([]unix.Iovec, n),
		names: make([][unix.SizeofSockaddrInet6]byte, n),
	}
	for i := range m.hdrs {
		m.hdrs[i].Hdr.Iov = &m.iovs[i]
		m.hdrs[i].Hdr.Iovlen = 1
	}
	return m
}

// recvmmsg reads up to len(bufs) datagrams from fd into bufs, their source addresses
// into m.names. It returns how many it read; hdrs[i].Len is each length and
// hdrs[i].Hdr.Flags has MSG_TRUNC for datagrams larger than their buffer.
func recvmmsg(fd int, m *mmsgs, bufs [][]byte) (int, error) {
	for i, b := range bufs {
		m.iovs[i].Base = &b[0]
		m.iovs[i].SetLen(len(b))
		h := &m.hdrs[i].Hdr
		h.Name = &m.names[i][0]
		h.Namelen = unix.SizeofSockaddrInet6
		h.Flags = 0
	}
	for {
		// RawSyscall: the socket is non-blocking, so the call never parks the thread.
		n, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&m.hdrs[0])), uintptr(len(bufs)), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(n), nil
	}
}

// sendmmsg sends hdrs[:n], each already pointing at its payload and destination, and
// returns how many went.
func sendmmsg(fd int, hdrs []unix.Mmsghdr) (int, error) {
	for {
		n, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&hdrs[0])), uintptr(len(hdrs)), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(n), nil
	}
}

// sendto sends one datagram to sa.
func sendto(fd int, b []byte, sa *sockaddr) error {
	if len(b) == 0 {
		// A zero-length datagram is legal; give the kernel a valid pointer anyway.
		var z byte
		return sendtoPtr(fd, unsafe.Pointer(&z), 0, sa)
	}
	return sendtoPtr(fd, unsafe.Pointer(&b[0]), len(b), sa)
}

func sendtoPtr(fd int, p unsafe.Pointer, n int, sa *sockaddr) error {
	for {
		_, _, e := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(p), uintptr(n), unix.MSG_DONTWAIT, uintptr(unsafe.Pointer(&sa.b[0])), uintptr(sa.n))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		return nil
	}
}
