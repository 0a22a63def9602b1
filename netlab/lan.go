package netlab

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
)

// LANConfig describes a LAN: hosts on one Ethernet segment, for protocols that need a
// shared link (multicast, broadcast) rather than the routed internet of a Lab.
//
// The zero value is two hosts with IPv4 only.
type LANConfig struct {
	// Hosts is the number of hosts, 1 to 16; zero means 2.
	Hosts int
	// IPv6 turns IPv6 on in the hosts (link-local addresses, usable at once: duplicate
	// address detection is off). Without it, hosts have IPv6 disabled like every lab node.
	IPv6 bool
	// Logger receives progress; nil means quiet.
	Logger *slog.Logger
}

// LAN is a running LAN lab: hosts whose eth0 ports hang off one bridge in a switch
// namespace. Close (from the embedded Lab) tears it down. The Lab's Internet and Server
// are nil and it has no Sites.
type LAN struct {
	*Lab
	// Switch is the namespace holding the bridge br0.
	Switch *Host
	// Hosts are the end hosts; host i has address 198.18.0.(10+i)/24 on eth0.
	Hosts []*Host
}

// LANAddr returns host i's IPv4 address on a LAN.
func LANAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 0, byte(10 + i)}) }

// NewLAN builds a LAN lab. On failure everything built so far is removed.
func NewLAN(ctx context.Context, cfg LANConfig) (_ *LAN, err error) {
	if err := CheckRoot(); err != nil {
		return nil, err
	}
	n := cfg.Hosts
	if n == 0 {
		n = 2
	}
	if n < 1 || n > 16 {
		return nil, fmt.Errorf("netlab: LAN of %d hosts, want 1-16", n)
	}
	l := &Lab{log: cfg.Logger}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if err := l.claimID(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}
	}()
	lan := &LAN{Lab: l}
	if lan.Switch, err = l.addNode(ctx, "switch", "sw", nil, false); err != nil {
		return nil, err
	}
	// Snooping off: with no IGMP/MLD querier on the segment the bridge must flood
	// multicast to every port, as a plain switch does.
	if err := ipBatch(ctx, lan.Switch.NS, "link add br0 type bridge mcast_snooping 0", "link set br0 up"); err != nil {
		return nil, err
	}
	for i := range n {
		h, err := l.addNode(ctx, fmt.Sprintf("lan/h%d", i), fmt.Sprintf("h%d", i), []netip.Addr{LANAddr(i)}, false)
		if err != nil {
			return nil, err
		}
		if cfg.IPv6 {
			if err := enableIPv6(h.NS); err != nil {
				return nil, err
			}
		}
		port := fmt.Sprintf("p%d", i)
		if err := veth(ctx, h.NS, "eth0", lan.Switch.NS, port); err != nil {
			return nil, err
		}
		if err := ipBatch(ctx, lan.Switch.NS, fmt.Sprintf("link set %s master br0", port), fmt.Sprintf("link set %s up", port)); err != nil {
			return nil, err
		}
		if err := ipBatch(ctx, h.NS, fmt.Sprintf("addr add %s/24 dev eth0", LANAddr(i)), "link set eth0 up"); err != nil {
			return nil, err
		}
		lan.Hosts = append(lan.Hosts, h)
	}
	l.log.Info("LAN ready", "run", l.ID, "hosts", n, "ipv6", cfg.IPv6)
	return lan, nil
}

// enableIPv6 undoes addNode's IPv6 switch-off, with duplicate address detection off so
// link-local addresses work as soon as a link is up.
func enableIPv6(ns string) error {
	return inNetns(ns, func() error {
		for _, kv := range [][2]string{
			{"ipv6/conf/all/accept_dad", "0"},
			{"ipv6/conf/default/accept_dad", "0"},
			{"ipv6/conf/all/disable_ipv6", "0"},
			{"ipv6/conf/default/disable_ipv6", "0"},
		} {
			if err := os.WriteFile("/proc/sys/net/"+kv[0], []byte(kv[1]), 0); err != nil {
				return fmt.Errorf("netlab: %s: sysctl %s: %w", ns, kv[0], err)
			}
		}
		return nil
	})
}
