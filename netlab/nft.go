package netlab

import (
	"fmt"
	"net/netip"
	"strings"

	"peerlink/nat"
)

// The lab's routers are network namespaces whose NAT is written in nftables. Interface
// names inside a router are fixed: "wan" faces the internet (or the carrier-grade NAT),
// "lan0", "lan1", ... face its hosts.
const (
	wanIf = "wan"
	table = "peerlink"
	// bindingTimeout is how long an idle endpoint-independent mapping lasts. The kernel's
	// own UDP conntrack entries expire sooner (30 s unreplied, 120 s otherwise); the maps
	// keep the external port for the internal endpoint across them.
	bindingTimeout = "180s"
	// seqBase and seqCount are the external ports of the sequential NAT: each new
	// mapping takes the next one, wrapping after seqCount.
	seqBase  = 20000
	seqCount = 8192
)

// routerInput is shared by every router: the router itself answers pings on its WAN side
// and is otherwise silent there, so unsolicited probes are dropped rather than answered
// with ICMP errors.
func routerInput() string {
	return fmt.Sprintf(`	chain input {
		type filter hook input priority filter; policy accept;
		iifname %[1]q ct state established,related accept
		iifname %[1]q icmp type echo-request accept
		iifname %[1]q drop
	}
`, wanIf)
}

// eimRules builds an endpoint-independent-mapping NAT with the given filtering and
// allocation (PP or RD) for UDP; other protocols get a plain NAT with the same inbound
// policy as established-only.
//
// The kernel's snat keeps no per-endpoint port: two conntrack entries from one internal
// endpoint keep the same external port only while nothing clashes. So the mapping lives
// in dynamic maps. The record chain runs in postrouting after the nat chain, sees the
// port the kernel actually chose (the packet is already rewritten; the conntrack
// original tuple still names the internal endpoint) and stores it both ways:
//
//	eim_out: internal addr . port -> external addr . port   (new flows reuse it)
//	eim_in:  external port -> internal addr . port          (unsolicited inbound)
//	eim_used: external ports taken                          (a new endpoint whose own
//	          port is taken by another must not get it: it gets a random free one)
//	eim_peers: contacted remote IP . external port          (address-dependent filter)
func eimRules(wan netip.Addr, f nat.Filtering, a nat.Allocation) string {
	var b strings.Builder
	set := func(name, typ string) {
		fmt.Fprintf(&b, "\t%s { type %s; flags dynamic,timeout; timeout %s; size 65535; }\n", name, typ, bindingTimeout)
	}
	fmt.Fprintf(&b, "table ip %s {\n", table)
	set("map eim_out", "ipv4_addr . inet_service : ipv4_addr . inet_service")
	set("map eim_in", "inet_service : ipv4_addr . inet_service")
	set("set eim_used", "inet_service")
	if f == nat.FilteringHD {
		set("set eim_peers", "ipv4_addr . inet_service")
	}

	b.WriteString("\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n")
	switch f {
	case nat.FilteringEI:
		fmt.Fprintf(&b, "\t\tiifname %q meta l4proto udp dnat ip to udp dport map @eim_in\n", wanIf)
	case nat.FilteringHD:
		fmt.Fprintf(&b, "\t\tiifname %q ip saddr . udp dport @eim_peers dnat ip to udp dport map @eim_in\n", wanIf)
	}
	b.WriteString("\t}\n")

	b.WriteString("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n")
	fmt.Fprintf(&b, "\t\toifname %q meta l4proto udp snat ip to ip saddr . udp sport map @eim_out\n", wanIf)
	switch a {
	case nat.AllocationPP:
		// Without a port range snat keeps the source port when the resulting tuple is
		// unique, which it is once eim_used has ruled out other owners.
		fmt.Fprintf(&b, "\t\toifname %q udp sport @eim_used snat ip to %s:1024-65535 fully-random\n", wanIf, wan)
		fmt.Fprintf(&b, "\t\toifname %q meta l4proto udp snat ip to %s\n", wanIf, wan)
	default:
		fmt.Fprintf(&b, "\t\toifname %q meta l4proto udp snat ip to %s:1024-65535 fully-random\n", wanIf, wan)
	}
	fmt.Fprintf(&b, "\t\toifname %q snat ip to %s\n", wanIf, wan)
	b.WriteString("\t}\n")

	b.WriteString("\tchain record {\n\t\ttype filter hook postrouting priority srcnat + 10; policy accept;\n")
	fmt.Fprintf(&b, "\t\toifname %q meta l4proto udp ct direction original"+
		" update @eim_out { ct original ip saddr . ct original proto-src : ip saddr . udp sport }"+
		" update @eim_in { udp sport : ct original ip saddr . ct original proto-src }"+
		" update @eim_used { udp sport }", wanIf)
	if f == nat.FilteringHD {
		b.WriteString(" update @eim_peers { ip daddr . udp sport }")
	}
	b.WriteString("\n\t}\n")

	b.WriteString("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n")
	b.WriteString("\t\tct state established,related accept\n")
	if f == nat.FilteringEI || f == nat.FilteringHD {
		// Only the prerouting rules above create inbound translations.
		fmt.Fprintf(&b, "\t\tiifname %q ct status dnat accept\n", wanIf)
	}
	fmt.Fprintf(&b, "\t\tiifname %q drop\n", wanIf)
	b.WriteString("\t}\n")
	b.WriteString(routerInput())
	b.WriteString("}\n")
	return b.String()
}

// symmetricRules builds a NAT that maps every new destination to a new port: random
// (masquerade fully-random), or sequential when seq is set. snat with a port range is not
// sequential on this kernel (it starts at a random offset); a counter looked up in a
// typed map is, and each new conntrack entry takes the next port.
func symmetricRules(wan netip.Addr, seq bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table ip %s {\n", table)
	if seq {
		fmt.Fprintf(&b, "\tmap seq_ports {\n\t\ttypeof numgen inc mod %d : udp sport\n\t\telements = {", seqCount)
		for i := range seqCount {
			if i%16 == 0 {
				b.WriteString("\n\t\t\t")
			}
			fmt.Fprintf(&b, "%d : %d, ", i, seqBase+i)
		}
		b.WriteString("\n\t\t}\n\t}\n")
	}
	b.WriteString("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n")
	if seq {
		fmt.Fprintf(&b, "\t\toifname %q meta l4proto udp snat ip to %s : numgen inc mod %d map @seq_ports\n", wanIf, wan, seqCount)
		fmt.Fprintf(&b, "\t\toifname %q snat ip to %s\n", wanIf, wan)
	} else {
		fmt.Fprintf(&b, "\t\toifname %q meta l4proto { tcp, udp } snat ip to %s:1024-65535 fully-random\n", wanIf, wan)
		fmt.Fprintf(&b, "\t\toifname %q snat ip to %s\n", wanIf, wan)
	}
	b.WriteString("\t}\n")
	b.WriteString("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n")
	b.WriteString("\t\tct state established,related accept\n")
	fmt.Fprintf(&b, "\t\tiifname %q drop\n", wanIf)
	b.WriteString("\t}\n")
	b.WriteString(routerInput())
	b.WriteString("}\n")
	return b.String()
}

// firewallRules builds a NATing firewall that lets only TCP to port 443 out, and only
// replies in. Everything else is dropped silently, as corporate firewalls do.
func firewallRules(wan netip.Addr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table ip %s {\n", table)
	b.WriteString("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n")
	fmt.Fprintf(&b, "\t\toifname %q snat ip to %s\n", wanIf, wan)
	b.WriteString("\t}\n")
	b.WriteString("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n")
	b.WriteString("\t\tct state established,related accept\n")
	fmt.Fprintf(&b, "\t\tiifname %q drop\n", wanIf)
	fmt.Fprintf(&b, "\t\toifname %q tcp dport 443 accept\n", wanIf)
	fmt.Fprintf(&b, "\t\toifname %q drop\n", wanIf)
	b.WriteString("\t}\n")
	b.WriteString(routerInput())
	b.WriteString("}\n")
	return b.String()
}

// lossRules replaces the internet router's loss table: for each interface, a random
// share of the packets in each direction is dropped. Creating then deleting the table
// first makes the whole file one atomic replacement whether or not it existed.
func lossRules(loss map[string]int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table ip %s_loss\ndelete table ip %s_loss\n", table, table)
	fmt.Fprintf(&b, "table ip %s_loss {\n\tchain forward {\n\t\ttype filter hook forward priority filter - 10; policy accept;\n", table)
	for _, ifname := range sortedKeys(loss) {
		pct := loss[ifname]
		if pct <= 0 {
			continue
		}
		match := fmt.Sprintf("numgen random mod 100 < %d ", pct)
		if pct >= 100 {
			match = ""
		}
		fmt.Fprintf(&b, "\t\tiifname %q %sdrop\n", ifname, match)
		fmt.Fprintf(&b, "\t\toifname %q %sdrop\n", ifname, match)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}
