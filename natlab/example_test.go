package natlab_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"peerlink/nat"
	"peerlink/natlab"
)

// A laptop behind a port-restricted cone NAT talks to a public server: the server sees
// the NAT's address with the laptop's port preserved, and a stranger's packet to that
// address is filtered.
func Example() {
	n := natlab.New(natlab.Config{Seed: 1})
	defer n.Close()
	server := n.AddPublicHost("server", netip.MustParseAddr("203.0.113.10"))
	stranger := n.AddPublicHost("stranger", netip.MustParseAddr("203.0.113.20"))
	home := n.AddNAT(natlab.NATConfig{
		Name:     "home",
		Type:     nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP},
		PublicIP: netip.MustParseAddr("198.51.100.1"),
	})
	laptop := home.AddHost("laptop", netip.MustParseAddr("192.168.1.2"))

	ctx := context.Background()
	srv, _ := server.ListenPacket(ctx, "udp4", ":3478")
	other, _ := stranger.ListenPacket(ctx, "udp4", ":3478")
	pc, _ := laptop.ListenPacket(ctx, "udp4", ":5000")

	pc.WriteTo([]byte("hello"), &net.UDPAddr{IP: net.IPv4(203, 0, 113, 10), Port: 3478})
	buf := make([]byte, 1500)
	_, from, _ := srv.ReadFrom(buf)
	fmt.Println("server sees", from)

	other.WriteTo([]byte("unsolicited"), from)
	fmt.Println("filtered:", home.Stats().Filtered)

	srv.WriteTo([]byte("welcome"), from)
	k, src, _ := pc.ReadFrom(buf)
	fmt.Printf("laptop got %q from %v\n", buf[:k], src)
	// Output:
	// server sees 198.51.100.1:5000
	// filtered: 1
	// laptop got "welcome" from 203.0.113.10:3478
}
