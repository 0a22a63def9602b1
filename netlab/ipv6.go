package netlab

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
)

// IPv6 in the lab (Config.IPv6). The lab's IPv4 world stays as it is; next to it:
//
//   - every point-to-point link carries fe80::1 on its upstream end (the internet
//     router, a carrier-grade NAT's LAN port, a home router's LAN port) and fe80::2 on
//     its downstream end, which routes ::/0 via fe80::1;
//   - the server has ServerIPv6 on its link;
//   - site i owns 2001:db8:<i+1>::/64 (Site.IPv6Prefix). Behind a router, host k has
//     ::<k+2> and the home router ::1 (each host still has a link of its own, so the
//     addresses are /128s with host routes on the router); the internet routes the /64
//     via the outermost router's WAN address 2001:db8:ffff::<0x100+i>. A KindNone host
//     has ::2 on its public link;
//   - routers do not translate IPv6: they forward it through a stateful firewall, as a
//     home router does (homeFirewall6).
//
// Duplicate address detection is off (accept_dad=0 and nodad), so addresses work at
// once, and no node sends router solicitations or accepts advertisements: routes are
// all static.

// delayNode names the namespace of the delay relays, which stays IPv4-only: it has no
// addresses and must not add frames of its own to the links it relays.
const delayNode = "dly"

// ServerIPv6 are the server's two IPv6 addresses in an IPv6 lab (Lab.Server.IPv6).
var ServerIPv6 = [2]netip.Addr{netip.MustParseAddr("2001:db8:ffff::10"), netip.MustParseAddr("2001:db8:ffff::11")}

var (
	linkUp6   = netip.MustParseAddr("fe80::1")
	linkDown6 = netip.MustParseAddr("fe80::2")
)

// sitePrefix6 is site i's /64: 2001:db8:<i+1>::/64.
func sitePrefix6(i int) netip.Prefix {
	b := [16]byte{0x20, 0x01, 0x0d, 0xb8, byte((i + 1) >> 8), byte(i + 1)}
	return netip.PrefixFrom(netip.AddrFrom16(b), 64)
}

// inPrefix6 is the address with interface identifier id in p.
func inPrefix6(p netip.Prefix, id uint16) netip.Addr {
	b := p.Addr().As16()
	b[14], b[15] = byte(id>>8), byte(id)
	return netip.AddrFrom16(b)
}

// wanIPv6 is site i's outermost router's WAN address: 2001:db8:ffff::<0x100+i>.
func wanIPv6(i int) netip.Addr {
	return inPrefix6(netip.MustParsePrefix("2001:db8:ffff::/64"), uint16(0x100+i))
}

// ipv6Sysctls turn IPv6 on in a new namespace (before its links exist, so the defaults
// reach them), without duplicate address detection, router solicitations or
// autoconfiguration, and with forwarding on routers.
func ipv6Sysctls(forward bool) [][2]string {
	fwd := "0"
	if forward {
		fwd = "1"
	}
	var out [][2]string
	for _, scope := range []string{"all", "default"} {
		for _, kv := range [][2]string{
			{"accept_dad", "0"},
			{"accept_ra", "0"},
			{"autoconf", "0"},
			{"router_solicitations", "0"},
			{"disable_ipv6", "0"},
		} {
			out = append(out, [2]string{"ipv6/conf/" + scope + "/" + kv[0], kv[1]})
		}
	}
	return append(out, [2]string{"ipv6/conf/all/forwarding", fwd})
}

// link6 puts fe80::1 on the upstream end of a link and fe80::2 on the downstream end,
// whose default route goes via fe80::1. Both ends must be up.
func link6(ctx context.Context, upNS, upIf, downNS, downIf string) error {
	if err := ipBatch(ctx, upNS, fmt.Sprintf("addr add %s/64 dev %s nodad", linkUp6, upIf)); err != nil {
		return err
	}
	return ipBatch(ctx, downNS,
		fmt.Sprintf("addr add %s/64 dev %s nodad", linkDown6, downIf),
		fmt.Sprintf("route add ::/0 via %s dev %s", linkUp6, downIf),
	)
}

// serverIPv6 gives the server its IPv6 addresses and the internet routes to them.
func (l *Lab) serverIPv6(ctx context.Context) error {
	if err := link6(ctx, l.Internet.NS, "srv", l.Server.NS, "eth0"); err != nil {
		return err
	}
	var srv, inet []string
	for _, a := range ServerIPv6 {
		srv = append(srv, fmt.Sprintf("addr add %s/128 dev eth0 nodad", a))
		inet = append(inet, fmt.Sprintf("route add %s/128 via %s dev srv", a, linkDown6))
	}
	if err := ipBatch(ctx, l.Server.NS, srv...); err != nil {
		return err
	}
	if err := ipBatch(ctx, l.Internet.NS, inet...); err != nil {
		return err
	}
	l.Server.IPv6 = ServerIPv6[:]
	return nil
}

// openIPv6 gives KindNone site i's host its address on its public link.
func (l *Lab) openIPv6(ctx context.Context, s *Site, i int, h *Host) error {
	s.IPv6Prefix = sitePrefix6(i)
	addr := inPrefix6(s.IPv6Prefix, 2)
	if err := link6(ctx, l.Internet.NS, s.ifname, h.NS, "eth0"); err != nil {
		return err
	}
	if err := ipBatch(ctx, h.NS, fmt.Sprintf("addr add %s/128 dev eth0 nodad", addr)); err != nil {
		return err
	}
	if err := ipBatch(ctx, l.Internet.NS, fmt.Sprintf("route add %s via %s dev %s", s.IPv6Prefix, linkDown6, s.ifname)); err != nil {
		return err
	}
	h.IPv6 = []netip.Addr{addr}
	return nil
}

// siteIPv6 routes site i's /64 from the internet through its routers to its hosts and
// puts up the home router's firewall. The carrier-grade NAT of a KindCGNAT site only
// routes IPv6, as carriers do; the subscriber behind it stays IPv4-only.
func (l *Lab) siteIPv6(ctx context.Context, s *Site, i int, outer, home *Host) error {
	s.IPv6Prefix = sitePrefix6(i)
	wan := wanIPv6(i)
	if err := link6(ctx, l.Internet.NS, s.ifname, outer.NS, wanIf); err != nil {
		return err
	}
	if err := ipBatch(ctx, outer.NS, fmt.Sprintf("addr add %s/128 dev %s nodad", wan, wanIf)); err != nil {
		return err
	}
	outer.IPv6 = []netip.Addr{wan}
	// The WAN address is on the link (the router answers neighbour solicitations for
	// it), and the site's prefix is routed via it.
	if err := ipBatch(ctx, l.Internet.NS,
		fmt.Sprintf("route add %s/128 dev %s", wan, s.ifname),
		fmt.Sprintf("route add %s via %s dev %s", s.IPv6Prefix, wan, s.ifname),
	); err != nil {
		return err
	}
	if home != outer {
		// Carrier link: the CGN's lan0 faces the home router's wan.
		if err := link6(ctx, outer.NS, "lan0", home.NS, wanIf); err != nil {
			return err
		}
		if err := ipBatch(ctx, outer.NS, fmt.Sprintf("route add %s via %s dev lan0", s.IPv6Prefix, linkDown6)); err != nil {
			return err
		}
	}
	if err := ipBatch(ctx, home.NS, fmt.Sprintf("addr add %s/128 dev lan0 nodad", inPrefix6(s.IPv6Prefix, 1))); err != nil {
		return err
	}
	for k, h := range s.Hosts {
		lanIf := fmt.Sprintf("lan%d", k)
		addr := inPrefix6(s.IPv6Prefix, uint16(k+2))
		if err := link6(ctx, home.NS, lanIf, h.NS, "eth0"); err != nil {
			return err
		}
		if err := ipBatch(ctx, h.NS, fmt.Sprintf("addr add %s/128 dev eth0 nodad", addr)); err != nil {
			return err
		}
		if err := ipBatch(ctx, home.NS, fmt.Sprintf("route add %s/128 via %s dev %s", addr, linkDown6, lanIf)); err != nil {
			return err
		}
		h.IPv6 = []netip.Addr{addr}
	}
	return nftApply(ctx, home.NS, homeFirewall6(s.Kind))
}

// homeFirewall6 is a home router's IPv6 firewall (RFC 6092 in spirit): it forwards
// without translation, lets everything from the LAN out and, from the WAN, only what
// belongs to a flow the LAN started. So two hosts behind such routers reach each other
// once both have sent (a simultaneous open), and unsolicited traffic is dropped.
//
// KindFullCone opens more, matching its endpoint-independent filtering: once a LAN
// address and UDP port has sent anything out, any internet host may send UDP to it
// (until bindingTimeout of silence). KindUDPBlocked lets only TCP to port 443 out, as
// it does for IPv4. Neighbour discovery reaches the router itself from the WAN, and
// ICMPv6 errors for known flows pass as related.
func homeFirewall6(k Kind) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table ip6 %s {\n", table)
	if k == KindFullCone {
		fmt.Fprintf(&b, "\tset open6 { type ipv6_addr . inet_service; flags dynamic,timeout; timeout %s; size 65535; }\n", bindingTimeout)
	}
	b.WriteString("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n")
	if k == KindFullCone {
		fmt.Fprintf(&b, "\t\toifname %q meta l4proto udp update @open6 { ip6 saddr . udp sport }\n", wanIf)
	}
	b.WriteString("\t\tct state established,related accept\n")
	if k == KindFullCone {
		fmt.Fprintf(&b, "\t\tiifname %q meta l4proto udp ip6 daddr . udp dport @open6 accept\n", wanIf)
	}
	fmt.Fprintf(&b, "\t\tiifname %q drop\n", wanIf)
	if k == KindUDPBlocked {
		fmt.Fprintf(&b, "\t\toifname %q tcp dport 443 accept\n", wanIf)
		fmt.Fprintf(&b, "\t\toifname %q drop\n", wanIf)
	}
	b.WriteString("\t}\n")
	fmt.Fprintf(&b, `	chain input {
		type filter hook input priority filter; policy accept;
		iifname %[1]q ct state established,related accept
		iifname %[1]q icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, echo-request } accept
		iifname %[1]q drop
	}
`, wanIf)
	b.WriteString("}\n")
	return b.String()
}

// lossRules6 is lossRules for IPv6.
func lossRules6(loss map[string]int) string {
	return strings.ReplaceAll(lossRules(loss), "table ip ", "table ip6 ")
}
