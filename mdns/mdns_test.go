package mdns

import (
	"context"
	"crypto/ed25519"
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/dns/dnsmessage"

	"peerlink/clock"
	"peerlink/identity"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testID returns a fixed NodeID from a seed byte.
func testID(seed byte) identity.NodeID {
	var s [ed25519.SeedSize]byte
	s[0] = seed
	return identity.FromPrivateKey(ed25519.NewKeyFromSeed(s[:])).NodeID()
}

// newTestAdvertiser builds an Advertiser's records without sockets.
func newTestAdvertiser(t *testing.T, svc Service) *Advertiser {
	t.Helper()
	a, err := newAdvertiser(Config{}, svc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.sched.close)
	return a
}

func TestPacketRoundTrip(t *testing.T) {
	id := testID(1)
	inst := id.String() + "._peerlink._udp.local."
	host := id.String() + ".local."
	tests := []struct {
		name string
		pk   packet
	}{
		{"query", packet{Questions: []question{{Name: "_peerlink._udp.local.", Type: dnsmessage.TypePTR}}}},
		{"QU query with known answer", packet{
			Questions: []question{{Name: "_peerlink._udp.local.", Type: dnsmessage.TypePTR, Unicast: true}},
			Answers:   []record{{Name: "_peerlink._udp.local.", Type: dnsmessage.TypePTR, TTL: 100, Target: inst}},
		}},
		{"announcement", packet{Response: true, Answers: []record{
			{Name: "_peerlink._udp.local.", Type: dnsmessage.TypePTR, TTL: 120, Target: inst},
			{Name: inst, Type: dnsmessage.TypeSRV, Flush: true, TTL: 120, Target: host, Port: 4242},
			{Name: inst, Type: dnsmessage.TypeTXT, Flush: true, TTL: 120, TXT: []string{"node=" + id.String(), "v=1"}},
			{Name: host, Type: dnsmessage.TypeA, Flush: true, TTL: 120, Addr: netip.MustParseAddr("198.18.0.10")},
			{Name: host, Type: dnsmessage.TypeAAAA, Flush: true, TTL: 120, Addr: netip.MustParseAddr("fe80::1")},
		}}},
		{"legacy reply", packet{ID: 0x1234, Response: true,
			Questions: []question{{Name: host, Type: dnsmessage.TypeA}},
			Answers:   []record{{Name: host, Type: dnsmessage.TypeA, TTL: 10, Addr: netip.MustParseAddr("198.18.0.10")}},
			Extra:     []record{{Name: host, Type: dnsmessage.TypeAAAA, TTL: 10, Addr: netip.MustParseAddr("2001:db8::1")}},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.pk.encode()
			if err != nil {
				t.Fatal(err)
			}
			got, err := parsePacket(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*got, tc.pk) {
				t.Errorf("round trip:\n got %+v\nwant %+v", *got, tc.pk)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	good, err := (&packet{Questions: []question{{Name: "a.local.", Type: dnsmessage.TypeA}}}).encode()
	if err != nil {
		t.Fatal(err)
	}
	opcode := slices.Clone(good)
	opcode[2] |= 0x10 // opcode 2
	tests := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short header", good[:5]},
		{"truncated question", good[:len(good)-2]},
		{"opcode", opcode},
		{"oversized", make([]byte, maxPacket+1)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := parsePacket(tc.b); !errors.Is(err, ErrMalformed) {
				t.Errorf("parsePacket = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestTXT(t *testing.T) {
	tests := []struct {
		in   []string
		want map[string]string
	}{
		{[]string{"node=x", "v=1"}, map[string]string{"node": "x", "v": "1"}},
		{[]string{"Node=x", "node=y"}, map[string]string{"node": "x"}},
		{[]string{"flag", "=nokey", ""}, map[string]string{"flag": ""}},
		{[]string{"k=a=b"}, map[string]string{"k": "a=b"}},
	}
	for _, tc := range tests {
		if got := parseTXT(tc.in); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("parseTXT(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
	got := formatTXT(map[string]string{"z": "1", "a": "2", KeyVersion: "1", KeyNode: "n"})
	if want := []string{"node=n", "v=1", "a=2", "z=1"}; !slices.Equal(got, want) {
		t.Errorf("formatTXT = %q, want %q", got, want)
	}
}

func TestAdvertiseRejects(t *testing.T) {
	id := testID(2)
	long := string(make([]byte, 300))
	tests := []struct {
		name string
		svc  Service
	}{
		{"no node", Service{Port: 1}},
		{"no port", Service{NodeID: id}},
		{"short ttl", Service{NodeID: id, Port: 1, TTL: time.Millisecond}},
		{"reserved key", Service{NodeID: id, Port: 1, TXT: map[string]string{"Node": "x"}}},
		{"key with =", Service{NodeID: id, Port: 1, TXT: map[string]string{"a=b": "x"}}},
		{"long entry", Service{NodeID: id, Port: 1, TXT: map[string]string{"k": long}}},
		{"bad addr", Service{NodeID: id, Port: 1, Addrs: []netip.Addr{{}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Advertise(context.Background(), Config{}, tc.svc)
			if !errors.Is(err, ErrBadService) {
				t.Errorf("Advertise = %v, want ErrBadService", err)
			}
		})
	}
}

func TestRespond(t *testing.T) {
	id := testID(3)
	a := newTestAdvertiser(t, Service{NodeID: id, Port: 4242, Profile: "full-cone"})
	ifc := &iface{Index: 2, Name: "eth0", V4: []netip.Addr{netip.MustParseAddr("198.18.0.10")}, V6: []netip.Addr{netip.MustParseAddr("fe80::1")}}
	ptrQ := question{Name: "_peerlink._udp.local.", Type: dnsmessage.TypePTR}
	types := func(rs []record) []dnsmessage.Type {
		var out []dnsmessage.Type
		for _, r := range rs {
			out = append(out, r.Type)
		}
		return out
	}
	A, AAAA, PTR, SRV, TXT := dnsmessage.TypeA, dnsmessage.TypeAAAA, dnsmessage.TypePTR, dnsmessage.TypeSRV, dnsmessage.TypeTXT
	tests := []struct {
		name          string
		q             packet
		legacy        bool
		wantNil       bool
		answers       []dnsmessage.Type
		extra         []dnsmessage.Type
		unicast, shrd bool
	}{
		{name: "browse", q: packet{Questions: []question{ptrQ}}, answers: []dnsmessage.Type{PTR}, extra: []dnsmessage.Type{SRV, TXT, A, AAAA}, shrd: true},
		{name: "browse QU", q: packet{Questions: []question{{Name: ptrQ.Name, Type: PTR, Unicast: true}}}, answers: []dnsmessage.Type{PTR}, extra: []dnsmessage.Type{SRV, TXT, A, AAAA}, unicast: true, shrd: true},
		{name: "case-insensitive", q: packet{Questions: []question{{Name: "_PeerLink._UDP.Local.", Type: PTR}}}, answers: []dnsmessage.Type{PTR}, extra: []dnsmessage.Type{SRV, TXT, A, AAAA}, shrd: true},
		{name: "known answer suppressed", q: packet{Questions: []question{ptrQ}, Answers: []record{a.ptr(100)}}, wantNil: true},
		{name: "stale known answer", q: packet{Questions: []question{ptrQ}, Answers: []record{a.ptr(30)}}, answers: []dnsmessage.Type{PTR}, extra: []dnsmessage.Type{SRV, TXT, A, AAAA}, shrd: true},
		{name: "other service", q: packet{Questions: []question{{Name: "_http._tcp.local.", Type: PTR}}}, wantNil: true},
		{name: "enumeration", q: packet{Questions: []question{{Name: enumName, Type: PTR}}}, answers: []dnsmessage.Type{PTR}, shrd: true},
		{name: "SRV", q: packet{Questions: []question{{Name: a.instance, Type: SRV}}}, answers: []dnsmessage.Type{SRV}, extra: []dnsmessage.Type{A, AAAA}},
		{name: "ANY instance", q: packet{Questions: []question{{Name: a.instance, Type: dnsmessage.TypeALL}}}, answers: []dnsmessage.Type{SRV, TXT}, extra: []dnsmessage.Type{A, AAAA}},
		{name: "A", q: packet{Questions: []question{{Name: a.host, Type: A}}}, answers: []dnsmessage.Type{A}, extra: []dnsmessage.Type{AAAA}},
		{name: "legacy A", q: packet{ID: 7, Questions: []question{{Name: a.host, Type: A}}}, legacy: true, answers: []dnsmessage.Type{A}, extra: []dnsmessage.Type{AAAA}, unicast: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, unicast, shared := a.respond(&tc.q, ifc, tc.legacy)
			if tc.wantNil {
				if resp != nil {
					t.Fatalf("respond = %+v, want nothing", resp)
				}
				return
			}
			if resp == nil {
				t.Fatal("no response")
			}
			if got := types(resp.Answers); !slices.Equal(got, tc.answers) {
				t.Errorf("answers %v, want %v", got, tc.answers)
			}
			if got := types(resp.Extra); !slices.Equal(got, tc.extra) {
				t.Errorf("extra %v, want %v", got, tc.extra)
			}
			if unicast != tc.unicast || shared != tc.shrd {
				t.Errorf("unicast %v shared %v, want %v %v", unicast, shared, tc.unicast, tc.shrd)
			}
			for _, r := range append(slices.Clone(resp.Answers), resp.Extra...) {
				if tc.legacy && (r.Flush || r.TTL > legacyTTL || resp.ID != tc.q.ID || len(resp.Questions) != 1) {
					t.Errorf("legacy reply record %+v (ID %d)", r, resp.ID)
				}
				if !tc.legacy && r.Flush == (r.Type == PTR) {
					t.Errorf("record %v cache-flush %v", r.Type, r.Flush)
				}
				if r.Type == A && r.Addr != ifc.V4[0] || r.Type == AAAA && r.Addr != ifc.V6[0] {
					t.Errorf("address record %v", r.Addr)
				}
			}
			if _, err := resp.encode(); err != nil {
				t.Errorf("encode: %v", err)
			}
		})
	}
}

// fakeBrowser is a Browser on a fake clock whose queries are recorded, fed packets by
// hand.
type fakeBrowser struct {
	*Browser
	clk *clock.Fake
	qmu sync.Mutex
	qs  [][]question
}

func newFakeBrowser(t *testing.T) *fakeBrowser {
	clk := clock.NewFake(time.Unix(1_000_000, 0))
	fb := &fakeBrowser{clk: clk}
	fb.Browser = newBrowser(Config{Clock: clk})
	fb.sendQueries = func(qs []question, _ []record) {
		fb.qmu.Lock()
		fb.qs = append(fb.qs, qs)
		fb.qmu.Unlock()
	}
	fb.start()
	t.Cleanup(func() { fb.Close() })
	return fb
}

func (fb *fakeBrowser) feed(pk *packet) { fb.handle(pk, GroupV4, &iface{Index: 2, Name: "eth0"}) }

func (fb *fakeBrowser) queries() [][]question {
	fb.qmu.Lock()
	defer fb.qmu.Unlock()
	return slices.Clone(fb.qs)
}

func nextEvent(t *testing.T, ch <-chan Event) Event {
	t.Helper()
	select {
	case ev := <-ch:
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	return Event{}
}

func noEvent(t *testing.T, ch <-chan Event) {
	t.Helper()
	select {
	case ev := <-ch:
		t.Fatalf("unexpected event %v %+v", ev.Kind, ev.Peer)
	case <-time.After(50 * time.Millisecond):
	}
}

func TestBrowserCache(t *testing.T) {
	id := testID(4)
	a := newTestAdvertiser(t, Service{NodeID: id, Port: 4242, Profile: "symmetric", TTL: 10 * time.Second})
	ifc := &iface{Index: 2, Name: "eth0", V4: []netip.Addr{netip.MustParseAddr("198.18.0.10")}, V6: []netip.Addr{netip.MustParseAddr("fe80::1")}}

	t.Run("announce then goodbye", func(t *testing.T) {
		fb := newFakeBrowser(t)
		fb.feed(a.announcement(ifc, a.ttl))
		ev := nextEvent(t, fb.Events())
		want := []netip.Addr{netip.MustParseAddr("198.18.0.10"), netip.MustParseAddr("fe80::1%eth0")}
		if ev.Kind != Found || ev.Peer.NodeID != id || ev.Peer.Port != 4242 || !slices.Equal(ev.Peer.Addrs, want) ||
			ev.Peer.Profile != "symmetric" || ev.Peer.Interface != "eth0" || ev.Peer.Host != a.host {
			t.Fatalf("event %v %+v", ev.Kind, ev.Peer)
		}
		fb.feed(a.announcement(ifc, a.ttl))
		noEvent(t, fb.Events())
		fb.feed(a.announcement(ifc, 0))
		noEvent(t, fb.Events()) // goodbye takes effect after a second
		fb.clk.Advance(goodbyeGrace)
		if ev := nextEvent(t, fb.Events()); ev.Kind != Lost || ev.Peer.NodeID != id {
			t.Fatalf("event %v %+v", ev.Kind, ev.Peer)
		}
		if len(fb.Peers()) != 0 {
			t.Errorf("peers after goodbye: %+v", fb.Peers())
		}
	})

	t.Run("expiry with refresh queries", func(t *testing.T) {
		fb := newFakeBrowser(t)
		fb.feed(a.announcement(ifc, a.ttl))
		nextEvent(t, fb.Events())
		before := len(fb.queries())
		fb.clk.Advance(7 * time.Second)
		noEvent(t, fb.Events())
		fb.clk.Advance(2700 * time.Millisecond) // past 95% (plus 2% jitter) of 10 s
		refreshed := 0
		for _, qs := range fb.queries()[before:] {
			for _, q := range qs {
				if nameEqual(q.Name, a.instance) || nameEqual(q.Name, a.host) {
					refreshed++
				}
			}
		}
		if refreshed < 4 {
			t.Errorf("%d refresh questions for the instance and host, want at least 4", refreshed)
		}
		noEvent(t, fb.Events())
		fb.clk.Advance(300 * time.Millisecond)
		if ev := nextEvent(t, fb.Events()); ev.Kind != Lost {
			t.Fatalf("event %v, want lost", ev.Kind)
		}
	})

	t.Run("PTR only, then resolved", func(t *testing.T) {
		fb := newFakeBrowser(t)
		fb.feed(&packet{Response: true, Answers: []record{a.ptr(a.ttl)}})
		noEvent(t, fb.Events())
		fb.clk.Advance(2 * time.Second)
		asked := map[dnsmessage.Type]bool{}
		for _, qs := range fb.queries() {
			for _, q := range qs {
				if nameEqual(q.Name, a.instance) {
					asked[q.Type] = true
				}
			}
		}
		if !asked[dnsmessage.TypeSRV] || !asked[dnsmessage.TypeTXT] {
			t.Fatalf("browser asked %v about the instance, want SRV and TXT", asked)
		}
		fb.feed(&packet{Response: true, Answers: []record{a.srv(a.ttl), a.txtRecord(a.ttl)}})
		noEvent(t, fb.Events()) // no address yet
		fb.feed(&packet{Response: true, Answers: a.addrRecords(ifc, a.ttl, dnsmessage.TypeA)})
		if ev := nextEvent(t, fb.Events()); ev.Kind != Found || len(ev.Peer.Addrs) != 1 {
			t.Fatalf("event %v %+v", ev.Kind, ev.Peer)
		}
	})

	t.Run("address change", func(t *testing.T) {
		fb := newFakeBrowser(t)
		fb.feed(a.announcement(ifc, a.ttl))
		nextEvent(t, fb.Events())
		fb.clk.Advance(2 * time.Second)
		moved := &iface{Index: 2, Name: "eth0", V4: []netip.Addr{netip.MustParseAddr("198.18.0.99")}}
		fb.feed(a.announcement(moved, a.ttl))
		fb.clk.Advance(goodbyeGrace)
		// The new A record flushes the old one (a second later); the AAAA stays, as
		// cache-flush works per record type.
		want := []netip.Addr{moved.V4[0], netip.MustParseAddr("fe80::1%eth0")}
		var ev Event
		for ev = nextEvent(t, fb.Events()); ev.Kind == Updated && !slices.Equal(ev.Peer.Addrs, want); ev = nextEvent(t, fb.Events()) {
		}
		if ev.Kind != Updated {
			t.Fatalf("event %v %+v, want updated to %v", ev.Kind, ev.Peer, want)
		}
	})

	t.Run("first query and backoff", func(t *testing.T) {
		fb := newFakeBrowser(t)
		fb.clk.Advance(firstQueryMax)
		fb.clk.Advance(7 * time.Second)
		n := 0
		for _, qs := range fb.queries() {
			if len(qs) == 1 && qs[0] == (question{Name: serviceName(), Type: dnsmessage.TypePTR}) {
				n++
			}
		}
		// Queries at ~0.1, 1.1, 3.1 and 7.1 s.
		if n != 4 {
			t.Errorf("%d browse queries in 7 s, want 4", n)
		}
	})

	t.Run("lookup", func(t *testing.T) {
		fb := newFakeBrowser(t)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		go func() {
			time.Sleep(20 * time.Millisecond)
			fb.feed(a.announcement(ifc, a.ttl))
		}()
		p, err := fb.Lookup(ctx, id)
		if err != nil || p.NodeID != id {
			t.Fatalf("Lookup = %+v, %v", p, err)
		}
		short, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel2()
		if _, err := fb.Lookup(short, testID(99)); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Lookup of an absent node = %v", err)
		}
		fb.Close()
		if _, err := fb.Lookup(ctx, testID(99)); !errors.Is(err, ErrClosed) {
			t.Errorf("Lookup after Close = %v", err)
		}
	})
}

func TestBrowserIgnoresStrangers(t *testing.T) {
	fb := newFakeBrowser(t)
	other := "x._http._tcp.local."
	fb.feed(&packet{Response: true, Answers: []record{
		{Name: "_http._tcp.local.", Type: dnsmessage.TypePTR, TTL: 120, Target: other},
		{Name: other, Type: dnsmessage.TypeSRV, TTL: 120, Target: "h.local.", Port: 80},
		{Name: "h.local.", Type: dnsmessage.TypeA, TTL: 120, Addr: netip.MustParseAddr("198.18.0.3")},
		// A peerlink instance whose TXT and name carry no NodeID.
		{Name: "_peerlink._udp.local.", Type: dnsmessage.TypePTR, TTL: 120, Target: "nobody._peerlink._udp.local."},
		{Name: "nobody._peerlink._udp.local.", Type: dnsmessage.TypeSRV, TTL: 120, Target: "h.local.", Port: 80},
		{Name: "nobody._peerlink._udp.local.", Type: dnsmessage.TypeTXT, TTL: 120, TXT: []string{"node=garbage"}},
	}})
	noEvent(t, fb.Events())
	fb.mu.Lock()
	defer fb.mu.Unlock()
	if len(fb.instances) != 1 {
		t.Errorf("cached %d instances, want only the peerlink one", len(fb.instances))
	}
}
