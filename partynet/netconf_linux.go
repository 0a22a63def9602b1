package partynet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// checkConflicts refuses a party subnet that overlaps a route or an address the host
// has on another interface than name: the party's packets would go the wrong way, or
// the host's.
func checkConflicts(name string, prefixes ...netip.Prefix) error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("partynet: listing interfaces: %w", err)
	}
	names := make(map[int]string, len(links))
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	for _, p := range prefixes {
		if !p.IsValid() {
			continue
		}
		family := netlink.FAMILY_V4
		if p.Addr().Is6() {
			family = netlink.FAMILY_V6
		}
		routes, err := netlink.RouteList(nil, family)
		if err != nil {
			return fmt.Errorf("partynet: listing routes: %w", err)
		}
		for _, r := range routes {
			if r.Dst == nil || names[r.LinkIndex] == name {
				continue
			}
			rp, ok := prefixOf(r.Dst)
			if !ok || rp.Bits() == 0 || !rp.Overlaps(p) {
				continue
			}
			return fmt.Errorf("%w: party subnet %s overlaps the route to %s on %s; remove that route or leave the party", ErrAddressConflict, p, rp, names[r.LinkIndex])
		}
		addrs, err := netlink.AddrList(nil, family)
		if err != nil {
			return fmt.Errorf("partynet: listing addresses: %w", err)
		}
		for _, a := range addrs {
			ap, ok := prefixOf(a.IPNet)
			if !ok || names[a.LinkIndex] == name || !p.Contains(ap.Addr()) {
				continue
			}
			return fmt.Errorf("%w: party subnet %s contains %s, an address of %s", ErrAddressConflict, p, ap.Addr(), names[a.LinkIndex])
		}
	}
	return nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// configure gives the interface its addresses (with the IPv4 subnet's broadcast, so
// programs can send to it) and brings it up. The kernel adds the subnet routes. Where
// IPv6 is disabled (the kernel refuses the address with EACCES) the interface has
// IPv4 only, and errNoIPv6 says so after the interface is up.
func configure(name string, v4, v6 netip.Prefix) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("partynet: finding interface %s: %w", name, err)
	}
	a4 := &netlink.Addr{IPNet: ipNet(v4), Broadcast: broadcastOf(v4).AsSlice()}
	if err := netlink.AddrReplace(link, a4); err != nil {
		return fmt.Errorf("partynet: adding %s to %s: %w", v4, name, err)
	}
	if v6.IsValid() {
		// No duplicate address detection: the party's addresses are assigned by the
		// rendezvous server, and DAD would hold the address back for a second.
		a6 := &netlink.Addr{IPNet: ipNet(v6), Flags: unix.IFA_F_NODAD}
		if err := netlink.AddrReplace(link, a6); err != nil {
			if !errors.Is(err, unix.EACCES) {
				return fmt.Errorf("partynet: adding %s to %s: %w", v6, name, err)
			}
			v6 = netip.Prefix{}
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("partynet: bringing %s up: %w", name, err)
	}
	if !v6.IsValid() {
		return errNoIPv6
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
