// Package mdns finds peerlink nodes on the local link with multicast DNS service discovery (RFC 6762, RFC 6763).
package mdns

import (
	"errors"
	"log/slog"
	"net/netip"
	"time"

	"peerlink/clock"
	"peerlink/identity"
)

// ServiceType is the DNS-SD service peerlink nodes advertise and browse for.
const ServiceType = "_peerlink._udp"

// Domain is the only domain multicast DNS serves.
const Domain = "local"

// TXT keys peerlink writes and reads.
const (
	// KeyNode carries the advertiser's NodeID. Browsers take the NodeID from it, not from
	// the instance name, because a responder may rename an instance to resolve a conflict.
	KeyNode = "node"
	// KeyVersion is the TXT format version (TXTVersion).
	KeyVersion = "v"
	// KeyProfile is an optional free-form description of the node's NAT profile.
	KeyProfile = "profile"
	// TXTVersion is the value of KeyVersion this package writes.
	TXTVersion = "1"
)

// DefaultTTL is the record lifetime advertised when Service.TTL is zero. RFC 6762 §10
// recommends 120 s for records that name a host or its addresses.
const DefaultTTL = 120 * time.Second

// Multicast groups and port of RFC 6762.
var (
	GroupV4 = netip.AddrPortFrom(netip.MustParseAddr("224.0.0.251"), 5353)
	GroupV6 = netip.AddrPortFrom(netip.MustParseAddr("ff02::fb"), 5353)
)

// Errors.
var (
	// ErrClosed is returned by the methods of a closed Advertiser or Browser.
	ErrClosed = errors.New("mdns: closed")
	// ErrNoInterfaces is returned when no usable multicast interface is found or named.
	ErrNoInterfaces = errors.New("mdns: no usable multicast interface")
	// ErrBadService is wrapped when a Service cannot be advertised as given.
	ErrBadService = errors.New("mdns: bad service")
	// ErrMalformed is wrapped by the packet parser for packets that are not DNS messages.
	ErrMalformed = errors.New("mdns: malformed packet")
)

// Config is what Advertise and Browse share.
//
// The zero value uses every up, multicast-capable, non-loopback interface with both IPv4
// and IPv6 where they have addresses, logs nothing and runs on the real clock.
type Config struct {
	// Interfaces names the interfaces to use. Empty means every interface that is up,
	// multicast-capable, not loopback and has an address. Interfaces and their addresses
	// are read once, when Advertise or Browse starts: a process that enters a network
	// namespace only while starting must not have them looked up later from elsewhere.
	Interfaces []string
	// DisableIPv4 and DisableIPv6 turn one family off. Both false (the zero value) means
	// both families on every interface that has an address of that family.
	DisableIPv4, DisableIPv6 bool
	// Logger receives debug and warning messages; nil means quiet.
	Logger *slog.Logger
	// Clock times announcements, queries and expiry; nil means the real clock.
	Clock clock.Clock

	// tap, when set (by tests), sees every received packet before it is handled.
	tap func(b []byte, src netip.AddrPort, ifIndex int)
}

func (c *Config) log() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

// Service is what an Advertiser advertises.
type Service struct {
	// NodeID names the instance and is written to the TXT record. Required.
	NodeID identity.NodeID
	// Port is the UDP port the node receives peerlink traffic on. Required.
	Port uint16
	// Profile, if not empty, is published under KeyProfile (for instance a NAT profile's
	// classic name) so browsers can plan before they connect.
	Profile string
	// TXT holds extra key/value pairs. Keys must be printable ASCII without '=' and must
	// not be one of the keys this package sets.
	TXT map[string]string
	// Addrs are the addresses to advertise. Empty means, on each interface, that
	// interface's own addresses (read at start).
	Addrs []netip.Addr
	// TTL is the lifetime of the advertised records, rounded down to whole seconds.
	// Zero means DefaultTTL.
	TTL time.Duration
}

// Peer is a peerlink node found on the link.
type Peer struct {
	// NodeID is from the TXT record's KeyNode. mDNS is unauthenticated: it is a claim that
	// the connection handshake must verify, not an identity.
	NodeID identity.NodeID
	// Instance is the DNS-SD instance name, such as "pl….\_peerlink._udp.local.".
	Instance string
	// Host is the SRV target, such as "pl….local.".
	Host string
	// Port is the node's UDP port (from SRV).
	Port uint16
	// Addrs are the host's addresses, IPv4 first; link-local IPv6 addresses carry the
	// zone of the interface they were learnt on.
	Addrs []netip.Addr
	// TXT is every key/value pair of the TXT record; a key without '=' has value "".
	TXT map[string]string
	// Profile is TXT[KeyProfile].
	Profile string
	// Interface is the name of the interface the service was last heard on.
	Interface string
}

// AddrPorts returns every address of p with its port, ready to dial.
func (p Peer) AddrPorts() []netip.AddrPort {
	out := make([]netip.AddrPort, 0, len(p.Addrs))
	for _, a := range p.Addrs {
		out = append(out, netip.AddrPortFrom(a, p.Port))
	}
	return out
}

// EventKind says what happened to a peer.
type EventKind int

// Event kinds.
const (
	// Found: a peer's records became complete (NodeID, port and at least one address).
	Found EventKind = iota + 1
	// Updated: a known peer's port, addresses or TXT changed.
	Updated
	// Lost: a peer said goodbye, its records expired, or it lost its last address.
	Lost
)

func (k EventKind) String() string {
	switch k {
	case Found:
		return "found"
	case Updated:
		return "updated"
	case Lost:
		return "lost"
	}
	return "unknown"
}

// Event is a change in the set of peers a Browser sees.
type Event struct {
	Kind EventKind
	// Peer is the peer as it is now; for Lost, as it was last seen.
	Peer Peer
}
