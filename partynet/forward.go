package partynet

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/tun"
)

// Forward says which IPv4 broadcast and multicast packets sent on the party interface
// reach every member. WireGuard routes by destination address, and a broadcast has no
// member behind it, so the device carries each one to each member inside an IPv4
// packet addressed to that member's virtual IP (IP-in-IP): WireGuard encrypts it like
// any other packet and checks its source on arrival, and the receiving device unwraps
// it onto its own party interface, where programs see the original broadcast.
//
// The zero value forwards broadcasts (the party's subnet broadcast and
// 255.255.255.255) and DefaultGroups, which is what LAN games and service discovery
// use; other multicast traffic is not forwarded.
type Forward struct {
	// Off turns forwarding off: broadcasts and multicasts stay on the sender's side.
	Off bool
	// Groups lists the IPv4 multicast groups forwarded; nil means DefaultGroups.
	Groups []netip.Addr
	// AllMulticast forwards every IPv4 multicast group (224.0.0.0/4).
	AllMulticast bool
}

// DefaultGroups are the multicast groups of common discovery protocols: mDNS,
// LLMNR, SSDP (and WS-Discovery) and SLP.
var DefaultGroups = []netip.Addr{
	netip.AddrFrom4([4]byte{224, 0, 0, 251}),
	netip.AddrFrom4([4]byte{224, 0, 0, 252}),
	netip.AddrFrom4([4]byte{239, 255, 255, 250}),
	netip.AddrFrom4([4]byte{239, 255, 255, 253}),
}

var limitedBroadcast = netip.AddrFrom4([4]byte{255, 255, 255, 255})

const (
	ipv4HeaderLen = 20
	protoIPIP     = 4
)

// forwarded reports whether dst (an IPv4 destination on the party interface whose
// subnet is prefix) goes to every member.
func (f Forward) forwarded(dst netip.Addr, prefix netip.Prefix) bool {
	if f.Off || !dst.Is4() {
		return false
	}
	if dst == limitedBroadcast || dst == broadcastOf(prefix) {
		return true
	}
	if !dst.IsMulticast() {
		return false
	}
	if f.AllMulticast {
		return true
	}
	groups := f.Groups
	if groups == nil {
		groups = DefaultGroups
	}
	return slices.Contains(groups, dst)
}

// broadcastOf returns the broadcast address of an IPv4 prefix.
func broadcastOf(p netip.Prefix) netip.Addr {
	if !p.Addr().Is4() {
		return netip.Addr{}
	}
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	binary.BigEndian.PutUint32(a[:], binary.BigEndian.Uint32(a[:])|host)
	return netip.AddrFrom4(a)
}

// Errors from unwrap: the reasons a wrapped packet is dropped.
var (
	errNotWrapped  = errors.New("partynet: not a forwarded broadcast")
	errBadWrapping = errors.New("partynet: malformed forwarded broadcast")
)

// ipv4Dst returns the destination of an IPv4 packet, or false.
func ipv4Dst(p []byte) (netip.Addr, bool) {
	if len(p) < ipv4HeaderLen || p[0]>>4 != 4 {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4([4]byte(p[16:20])), true
}

// wrap appends to dst an IPv4 header from src to member, carrying inner.
func wrap(dst []byte, src, member netip.Addr, inner []byte) []byte {
	total := ipv4HeaderLen + len(inner)
	h := [ipv4HeaderLen]byte{0: 0x45, 8: 64, 9: protoIPIP}
	binary.BigEndian.PutUint16(h[2:4], uint16(total))
	s, d := src.As4(), member.As4()
	copy(h[12:16], s[:])
	copy(h[16:20], d[:])
	binary.BigEndian.PutUint16(h[10:12], checksum(h[:]))
	dst = append(dst, h[:]...)
	return append(dst, inner...)
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// unwrap checks a packet WireGuard delivered and, when it is a forwarded broadcast
// for self from a member of prefix, returns the broadcast inside it. The inner packet
// must come from the same member as the wrapping (WireGuard vouches for the wrapping's
// source) and go to a destination f forwards, so a member cannot use the wrapping to
// put arbitrary packets on another member's interface.
func unwrap(p []byte, self netip.Addr, prefix netip.Prefix, f Forward) ([]byte, error) {
	if len(p) < ipv4HeaderLen || p[0]>>4 != 4 || p[9] != protoIPIP {
		return nil, errNotWrapped
	}
	ihl := int(p[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(p[2:4]))
	if ihl < ipv4HeaderLen || total < ihl || total > len(p) || checksum(p[:ihl]) != 0 {
		return nil, errBadWrapping
	}
	src := netip.AddrFrom4([4]byte(p[12:16]))
	dst := netip.AddrFrom4([4]byte(p[16:20]))
	if dst != self || !prefix.Contains(src) {
		return nil, errBadWrapping
	}
	inner := p[ihl:total]
	if len(inner) < ipv4HeaderLen || inner[0]>>4 != 4 || int(inner[0]&0x0f)*4 < ipv4HeaderLen {
		return nil, errBadWrapping
	}
	innerTotal := int(binary.BigEndian.Uint16(inner[2:4]))
	if innerTotal < ipv4HeaderLen || innerTotal > len(inner) {
		return nil, errBadWrapping
	}
	inner = inner[:innerTotal]
	innerDst, _ := ipv4Dst(inner)
	if netip.AddrFrom4([4]byte(inner[12:16])) != src || !f.forwarded(innerDst, prefix) {
		return nil, errBadWrapping
	}
	return inner, nil
}

// forwardingTUN is the party interface as WireGuard sees it: the kernel's TUN
// device, with broadcasts and forwarded multicasts read from it turned into one
// wrapped copy per member, and wrapped copies written to it unwrapped.
type forwardingTUN struct {
	tun.Device
	fwd    Forward
	self   netip.Addr
	prefix netip.Prefix
	// members are the other members' virtual IPv4 addresses.
	members atomic.Pointer[[]netip.Addr]

	mu      sync.Mutex
	pending [][]byte // wrapped copies waiting for the next Read

	forwarded atomic.Uint64 // broadcasts read and sent on
	received  atomic.Uint64 // broadcasts received and written
	rejected  atomic.Uint64 // wrapped packets dropped by unwrap
}

// maxPending bounds the wrapped copies waiting, so a broadcast storm costs memory
// only up to a limit.
const maxPending = 1024

func newForwardingTUN(dev tun.Device, fwd Forward, self netip.Addr, prefix netip.Prefix) *forwardingTUN {
	t := &forwardingTUN{Device: dev, fwd: fwd, self: self, prefix: prefix}
	t.members.Store(&[]netip.Addr{})
	return t
}

func (t *forwardingTUN) setMembers(addrs []netip.Addr) { t.members.Store(&addrs) }

// Read implements tun.Device.
func (t *forwardingTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	t.mu.Lock()
	if len(t.pending) > 0 {
		n := 0
		for n < len(bufs) && n < len(t.pending) {
			sizes[n] = copy(bufs[n][offset:], t.pending[n])
			n++
		}
		t.pending = t.pending[n:]
		t.mu.Unlock()
		return n, nil
	}
	t.mu.Unlock()
	n, err := t.Device.Read(bufs, sizes, offset)
	if t.fwd.Off {
		return n, err
	}
	for i := range n {
		p := bufs[i][offset : offset+sizes[i]]
		dst, ok := ipv4Dst(p)
		if !ok || !t.fwd.forwarded(dst, t.prefix) {
			continue
		}
		sizes[i] = 0 // WireGuard skips it; the wrapped copies follow
		t.forwarded.Add(1)
		members := *t.members.Load()
		t.mu.Lock()
		for _, m := range members {
			if len(t.pending) >= maxPending {
				break
			}
			t.pending = append(t.pending, wrap(make([]byte, 0, ipv4HeaderLen+len(p)), t.self, m, p))
		}
		t.mu.Unlock()
	}
	return n, err
}

// Write implements tun.Device. WireGuard writes from one goroutine per member, so
// Write keeps no state between calls.
func (t *forwardingTUN) Write(bufs [][]byte, offset int) (int, error) {
	wrapped := false
	for _, b := range bufs {
		if isIPIP(b[offset:]) {
			wrapped = true
			break
		}
	}
	if !wrapped {
		return t.Device.Write(bufs, offset)
	}
	out := make([][]byte, 0, len(bufs))
	for _, b := range bufs {
		if p := b[offset:]; isIPIP(p) {
			inner, err := unwrap(p, t.self, t.prefix, t.fwd)
			if err != nil {
				t.rejected.Add(1)
				continue
			}
			b = b[:offset+copy(p, inner)]
			t.received.Add(1)
		}
		out = append(out, b)
	}
	if len(out) > 0 {
		if _, err := t.Device.Write(out, offset); err != nil {
			return 0, err
		}
	}
	return len(bufs), nil
}

func isIPIP(p []byte) bool { return len(p) >= ipv4HeaderLen && p[0]>>4 == 4 && p[9] == protoIPIP }
