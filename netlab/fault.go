package netlab

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
)

// Cut makes the site's NAT router drop every packet it would forward to or from the
// given internet addresses, as a NAT that loses a mapping or a link that fails does,
// and leaves other traffic alone: cutting a peer's public address kills a punched path
// while the path through a relay on the server stays up. Cut with no addresses heals
// the site. Each call replaces the previous one. In an IPv6 lab, addrs may be IPv6
// addresses too.
func (s *Site) Cut(ctx context.Context, addrs ...netip.Addr) error {
	if len(s.Routers) == 0 {
		return fmt.Errorf("netlab: site %s has no router to cut", s.Name)
	}
	var v4, v6 []netip.Addr
	for _, a := range addrs {
		if a.Unmap().Is4() {
			v4 = append(v4, a.Unmap())
		} else {
			v6 = append(v6, a)
		}
	}
	if len(v6) > 0 && !s.lab.ipv6 {
		return fmt.Errorf("netlab: cutting IPv6 addresses %v in a lab without IPv6", v6)
	}
	if err := nftApply(ctx, s.Routers[0].NS, cutRules("ip", v4)); err != nil {
		return err
	}
	if s.lab.ipv6 {
		return nftApply(ctx, s.Routers[0].NS, cutRules("ip6", v6))
	}
	return nil
}

// cutRules replaces the router's fault table of family ip or ip6, atomically as
// lossRules does.
func cutRules(family string, addrs []netip.Addr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s_fault\ndelete table %s %s_fault\n", family, table, family, table)
	fmt.Fprintf(&b, "table %s %s_fault {\n\tchain forward {\n\t\ttype filter hook forward priority filter - 20; policy accept;\n", family, table)
	for _, a := range addrs {
		fmt.Fprintf(&b, "\t\t%s daddr %s drop\n\t\t%s saddr %s drop\n", family, a, family, a)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// Flush makes the site's NATs forget every mapping, as a router that reboots or whose
// conntrack table is flushed does: established flows get new external ports where the
// NAT allocates them at random, and unsolicited traffic to the old ones is dropped.
func (s *Site) Flush(ctx context.Context) error {
	if len(s.Routers) == 0 {
		return fmt.Errorf("netlab: site %s has no NAT to flush", s.Name)
	}
	for _, r := range s.Routers {
		// The endpoint-independent NATs keep their mappings in nftables maps; the
		// others have none, so a missing map is no error.
		for _, m := range []string{"map eim_out", "map eim_in", "set eim_used", "set eim_peers"} {
			run(ctx, "", "ip", "netns", "exec", r.NS, "nft", "flush", strings.Fields(m)[0], "ip", table, strings.Fields(m)[1])
		}
		if s.lab.ipv6 {
			// A full-cone router's IPv6 firewall remembers open endpoints.
			run(ctx, "", "ip", "netns", "exec", r.NS, "nft", "flush", "set", "ip6", table, "open6")
		}
		if err := run(ctx, "", "ip", "netns", "exec", r.NS, "conntrack", "-F"); err != nil {
			return fmt.Errorf("netlab: flushing %s's conntrack table: %w", r.Name, err)
		}
	}
	return nil
}
