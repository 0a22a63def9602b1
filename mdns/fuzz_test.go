package mdns

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// fuzzSeeds adds what a peerlink advertiser and browser send; testdata holds packets
// captured from avahi-daemon in the LAN lab (MDNS_CAPTURE, see TestPeerlinkSeesAvahi).
func fuzzSeeds(f *testing.F) {
	a, err := newAdvertiser(Config{}, Service{NodeID: testID(30), Port: 4242, Profile: "full-cone", TXT: map[string]string{"x": "y"}})
	if err != nil {
		f.Fatal(err)
	}
	ifc := &iface{Index: 2, Name: "eth0", V4: []netip.Addr{netip.MustParseAddr("198.18.0.10")}, V6: []netip.Addr{netip.MustParseAddr("fe80::1")}}
	pks := []*packet{
		a.announcement(ifc, a.ttl),
		a.announcement(ifc, 0),
		{Questions: []question{{Name: serviceName(), Type: dnsmessage.TypePTR}}, Answers: []record{a.ptr(100)}},
		{ID: 9, Questions: []question{{Name: a.host, Type: dnsmessage.TypeA, Unicast: true}}},
	}
	for _, pk := range pks {
		b, err := pk.encode()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// FuzzParsePacket: the parser never panics, and what it accepts re-encodes to a packet
// that parses back the same.
func FuzzParsePacket(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		pk, err := parsePacket(b)
		if err != nil {
			return
		}
		for _, l := range [][]record{pk.Answers, pk.Extra} {
			for _, r := range l {
				if r.Type == dnsmessage.TypeTXT && len(r.TXT) == 0 {
					return // encodes as one empty string, as RFC 6763 wants
				}
			}
		}
		out, err := pk.encode()
		if err != nil {
			return // not every parsed packet can be built (a v4-mapped AAAA, say)
		}
		again, err := parsePacket(out)
		if err != nil {
			t.Fatalf("re-encoded packet does not parse: %v", err)
		}
		if !reflect.DeepEqual(pk, again) {
			t.Fatalf("round trip changed the packet:\n%+v\n%+v", pk, again)
		}
	})
}

// FuzzBrowserHandle: whatever arrives, the browser's cache stays consistent and only
// complete peers are reported.
func FuzzBrowserHandle(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		pk, err := parsePacket(b)
		if err != nil {
			return
		}
		pk.Response = true
		fb := newFakeBrowser(t)
		fb.feed(pk)
		for _, p := range fb.Peers() {
			if p.NodeID.IsZero() || p.Port == 0 || len(p.Addrs) == 0 {
				t.Fatalf("incomplete peer reported: %+v", p)
			}
		}
		fb.clk.Advance(25 * time.Hour)
		if n := len(fb.Peers()); n != 0 {
			t.Fatalf("%d peers left after every TTL ran out", n)
		}
		fb.mu.Lock()
		defer fb.mu.Unlock()
		if len(fb.instances) != 0 || len(fb.hosts) != 0 {
			t.Fatalf("cache holds %d instances and %d hosts after every TTL ran out", len(fb.instances), len(fb.hosts))
		}
	})
}
