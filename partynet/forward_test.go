package partynet

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	testPrefix = netip.MustParsePrefix("100.64.7.0/24")
	memberA    = netip.MustParseAddr("100.64.7.1")
	memberB    = netip.MustParseAddr("100.64.7.2")
)

// udp4 builds an IPv4 UDP packet (checksum-correct header; the UDP checksum is left
// zero, which IPv4 allows).
func udp4(src, dst netip.Addr, payload string) []byte {
	p := make([]byte, 28+len(payload))
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	s, d := src.As4(), dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[10:], checksum(p[:20]))
	binary.BigEndian.PutUint16(p[20:], 40000)
	binary.BigEndian.PutUint16(p[22:], 9999)
	binary.BigEndian.PutUint16(p[24:], uint16(8+len(payload)))
	copy(p[28:], payload)
	return p
}

func TestForwarded(t *testing.T) {
	tests := []struct {
		dst  string
		fwd  Forward
		want bool
	}{
		{"100.64.7.255", Forward{}, true},
		{"255.255.255.255", Forward{}, true},
		{"224.0.0.251", Forward{}, true},     // mDNS
		{"239.255.255.250", Forward{}, true}, // SSDP
		{"239.1.2.3", Forward{}, false},      // another group
		{"239.1.2.3", Forward{AllMulticast: true}, true},
		{"239.1.2.3", Forward{Groups: []netip.Addr{netip.MustParseAddr("239.1.2.3")}}, true},
		{"224.0.0.251", Forward{Groups: []netip.Addr{netip.MustParseAddr("239.1.2.3")}}, false},
		{"100.64.7.2", Forward{}, false}, // unicast goes through WireGuard
		{"100.64.8.255", Forward{}, false},
		{"100.64.7.255", Forward{Off: true}, false},
		{"ff02::fb", Forward{}, false},
	}
	for _, tt := range tests {
		if got := tt.fwd.forwarded(netip.MustParseAddr(tt.dst), testPrefix); got != tt.want {
			t.Errorf("%+v forwarded(%s) = %v, want %v", tt.fwd, tt.dst, got, tt.want)
		}
	}
}

func TestWrapUnwrap(t *testing.T) {
	bcast := udp4(memberA, netip.MustParseAddr("100.64.7.255"), "lan game here")
	w := wrap(nil, memberA, memberB, bcast)
	if len(w) != 20+len(bcast) || checksum(w[:20]) != 0 {
		t.Fatalf("wrapped packet: %d bytes, header checksum %#x", len(w), checksum(w[:20]))
	}
	inner, err := unwrap(w, memberB, testPrefix, Forward{})
	if err != nil || string(inner) != string(bcast) {
		t.Fatalf("unwrap = %x, %v; want the broadcast back", inner, err)
	}

	bad := []struct {
		name string
		p    []byte
		self netip.Addr
		fwd  Forward
		want error
	}{
		{"not IP-in-IP", bcast, memberB, Forward{}, errNotWrapped},
		{"for another member", w, netip.MustParseAddr("100.64.7.3"), Forward{}, errBadWrapping},
		{"forwarding off here", w, memberB, Forward{Off: true}, errBadWrapping},
		{"inner source spoofed", wrap(nil, memberA, memberB, udp4(netip.MustParseAddr("100.64.7.9"), netip.MustParseAddr("100.64.7.255"), "x")), memberB, Forward{}, errBadWrapping},
		{"inner unicast", wrap(nil, memberA, memberB, udp4(memberA, netip.MustParseAddr("10.0.0.1"), "x")), memberB, Forward{}, errBadWrapping},
		{"outer from outside the party", wrap(nil, netip.MustParseAddr("10.1.1.1"), memberB, udp4(netip.MustParseAddr("10.1.1.1"), netip.MustParseAddr("255.255.255.255"), "x")), memberB, Forward{}, errBadWrapping},
		{"truncated", w[:30], memberB, Forward{}, errBadWrapping},
		{"bad checksum", func() []byte { c := append([]byte(nil), w...); c[8]--; return c }(), memberB, Forward{}, errBadWrapping},
	}
	for _, tt := range bad {
		if _, err := unwrap(tt.p, tt.self, testPrefix, tt.fwd); !errors.Is(err, tt.want) {
			t.Errorf("%s: unwrap error %v, want %v", tt.name, err, tt.want)
		}
	}
}

func TestBroadcastOf(t *testing.T) {
	for p, want := range map[string]string{"100.64.7.0/24": "100.64.7.255", "100.64.0.0/10": "100.127.255.255", "10.0.0.5/30": "10.0.0.7"} {
		if got := broadcastOf(netip.MustParsePrefix(p)); got.String() != want {
			t.Errorf("broadcastOf(%s) = %s, want %s", p, got, want)
		}
	}
}

// FuzzUnwrap: whatever a member sends inside WireGuard, unwrap either refuses it or
// returns a forwarded broadcast from the wrapping's source that lies within the packet.
func FuzzUnwrap(f *testing.F) {
	bcast := udp4(memberA, netip.MustParseAddr("100.64.7.255"), "seed")
	f.Add(wrap(nil, memberA, memberB, bcast))
	f.Add(bcast)
	f.Add(wrap(nil, memberA, memberB, bcast[:20]))
	f.Add([]byte{0x45})
	f.Fuzz(func(t *testing.T, p []byte) {
		inner, err := unwrap(p, memberB, testPrefix, Forward{})
		if err != nil {
			return
		}
		dst, ok := ipv4Dst(inner)
		if !ok || !(Forward{}).forwarded(dst, testPrefix) {
			t.Fatalf("unwrap let through a packet to %v", dst)
		}
		if src := netip.AddrFrom4([4]byte(inner[12:16])); src != netip.AddrFrom4([4]byte(p[12:16])) {
			t.Fatalf("inner source %s differs from the wrapping's", src)
		}
	})
}
