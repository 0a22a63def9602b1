package natlab

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"syscall"

	"peerlink/nettype"
)

// The range ephemeral ports come from, as on Linux.
const (
	ephemeralMin = 32768
	ephemeralMax = 60999
)

// Host is a machine with one or more addresses on the internet or on a NAT's LAN. It
// is a nettype.PacketListener.
type Host struct {
	net   *Network
	name  string
	addrs []netip.Addr
	seg   *segment

	// Guarded by net.mu.
	link  *link
	rng   *rand.Rand // ephemeral ports
	conns map[netip.AddrPort]*conn
}

var _ nettype.PacketListener = (*Host)(nil)

func (n *Network) addHost(s *segment, name string, addrs []netip.Addr) *Host {
	n.addName(name)
	if len(addrs) == 0 {
		panic(fmt.Sprintf("natlab: host %q needs an address", name))
	}
	h := &Host{
		net:   n,
		name:  name,
		seg:   s,
		link:  &link{rng: newRand(n.seed, "host:"+name+":link")},
		rng:   newRand(n.seed, "host:"+name+":ports"),
		conns: map[netip.AddrPort]*conn{},
	}
	for _, a := range addrs {
		a = a.Unmap()
		n.claim(s, a, attachment{host: h})
		h.addrs = append(h.addrs, a)
	}
	n.hosts = append(n.hosts, h)
	return h
}

// Name returns the host's name.
func (h *Host) Name() string { return h.name }

// Addrs returns the host's addresses, in the order given.
func (h *Host) Addrs() []netip.Addr { return slices.Clone(h.addrs) }

// Addr returns the host's first address.
func (h *Host) Addr() netip.Addr { return h.addrs[0] }

// SetLink sets the latency, jitter and loss between the host and its network, for
// packets sent from now on in either direction.
func (h *Host) SetLink(l Link) {
	h.net.mu.Lock()
	defer h.net.mu.Unlock()
	h.link.Link = l
}

// ListenPacket opens a UDP socket on the host. network is "udp", "udp4" or "udp6";
// address is "ip:port" with an IP of this host or none ("" or unspecified: every
// address), and port 0 for an ephemeral port. As on Linux, "udp" bound to no
// particular address is dual-stack and reports itself as [::]:port. Errors are
// *net.OpError values like the kernel's (EADDRINUSE, EADDRNOTAVAIL).
func (h *Host) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	if err := ctx.Err(); err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	opErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: network, Addr: addrString(address), Err: err}
	}
	var want4, want6 bool
	switch network {
	case "udp":
		want4, want6 = true, true
	case "udp4":
		want4 = true
	case "udp6":
		want6 = true
	default:
		return nil, opErr(net.UnknownNetworkError(network))
	}
	hostPart, portPart, err := net.SplitHostPort(address)
	if err != nil {
		return nil, opErr(err)
	}
	port, err := strconv.ParseUint(portPart, 10, 16)
	if err != nil {
		return nil, opErr(&net.AddrError{Err: "invalid port", Addr: address})
	}
	ip := netip.IPv6Unspecified()
	if network == "udp4" {
		ip = netip.IPv4Unspecified()
	}
	if hostPart != "" {
		if ip, err = netip.ParseAddr(hostPart); err != nil {
			return nil, opErr(&net.AddrError{Err: "not an IP address (natlab has no DNS)", Addr: hostPart})
		}
		ip = ip.Unmap().WithZone("")
	}
	if !ip.IsUnspecified() {
		// A specific address fixes the family.
		want4, want6 = want4 && ip.Is4(), want6 && ip.Is6()
		if !want4 && !want6 {
			return nil, opErr(&net.AddrError{Err: "address family mismatch", Addr: address})
		}
	} else if want4 && want6 {
		ip = netip.IPv6Unspecified()
	}

	n := h.net
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, opErr(net.ErrClosed)
	}
	if !ip.IsUnspecified() && !h.owns(ip) {
		return nil, opErr(os.NewSyscallError("bind", syscall.EADDRNOTAVAIL))
	}
	if port == 0 {
		p, ok := h.ephemeralPort()
		if !ok {
			return nil, opErr(os.NewSyscallError("bind", syscall.EADDRINUSE))
		}
		port = uint64(p)
	}
	local := netip.AddrPortFrom(ip, uint16(port))
	if h.inUse(local) {
		return nil, opErr(os.NewSyscallError("bind", syscall.EADDRINUSE))
	}
	c := newConn(h, network, local, want4, want6)
	h.conns[local] = c
	return c, nil
}

type addrString string

func (a addrString) Network() string { return "udp" }
func (a addrString) String() string  { return string(a) }

// The methods below run with net.mu held.

func (h *Host) owns(ip netip.Addr) bool { return slices.Contains(h.addrs, ip) }

// inUse reports whether binding local would clash with an open socket. A socket bound
// to no particular address clashes with any other on its port.
func (h *Host) inUse(local netip.AddrPort) bool {
	for b := range h.conns {
		if b.Port() == local.Port() && (b.Addr() == local.Addr() || b.Addr().IsUnspecified() || local.Addr().IsUnspecified()) {
			return true
		}
	}
	return false
}

// ephemeralPort picks a random port no socket on the host uses.
func (h *Host) ephemeralPort() (uint16, bool) {
	const span = ephemeralMax - ephemeralMin + 1
	start := h.rng.IntN(span)
	for i := range span {
		p := uint16(ephemeralMin + (start+i)%span)
		if !h.inUse(netip.AddrPortFrom(netip.IPv6Unspecified(), p)) {
			return p, true
		}
	}
	return 0, false
}

// lookup returns the socket that receives packets for dst, or nil.
func (h *Host) lookup(dst netip.AddrPort) *conn {
	if c := h.conns[dst]; c != nil {
		return c
	}
	for _, wild := range []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()} {
		if c := h.conns[netip.AddrPortFrom(wild, dst.Port())]; c != nil && c.accepts(dst.Addr()) {
			return c
		}
	}
	return nil
}

// source picks the source address for a packet from local to dst: the bound address,
// or the host's first address of dst's family.
func (h *Host) source(local netip.AddrPort, dst netip.Addr) (netip.Addr, bool) {
	if !local.Addr().IsUnspecified() {
		return local.Addr(), true
	}
	for _, a := range h.addrs {
		if a.Is4() == dst.Is4() {
			return a, true
		}
	}
	return netip.Addr{}, false
}
