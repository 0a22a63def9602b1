package relay

import "net/netip"

// peerPolicy decides which peer addresses clients may relay to. The defaults keep the
// relay from being a way into the operator's own networks.
type peerPolicy struct {
	loopback, private bool
	denied            []netip.Prefix
}

var (
	privatePrefixes = []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("100.64.0.0/10"), // RFC 6598 shared address space (CGNAT)
		netip.MustParsePrefix("fc00::/7"),
	}
	// Never relayed to, whatever the options: "this network", reserved and
	// documentation ranges, and IPv6 forms that embed an IPv4 address a check by
	// prefix would miss.
	neverPrefixes = []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("240.0.0.0/4"),
		netip.MustParsePrefix("::/96"),          // IPv4-compatible
		netip.MustParsePrefix("64:ff9b::/96"),   // NAT64
		netip.MustParsePrefix("64:ff9b:1::/48"), // local-use NAT64
		netip.MustParsePrefix("2002::/16"),      // 6to4
	}
)

// allowed reports whether a client may relay to ip.
func (p *peerPolicy) allowed(ip netip.Addr) bool {
	ip = ip.Unmap()
	if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() || ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return false
	}
	for _, pf := range p.denied {
		if pf.Contains(ip) {
			return false
		}
	}
	switch {
	case ip.IsLoopback():
		return p.loopback
	case ip.IsLinkLocalUnicast():
		return p.private
	}
	for _, pf := range neverPrefixes {
		if pf.Contains(ip) {
			return false
		}
	}
	if !p.private {
		for _, pf := range privatePrefixes {
			if pf.Contains(ip) {
				return false
			}
		}
	}
	return true
}
