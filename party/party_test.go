package party

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"peerlink/identity"
)

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func nodeID(i int) identity.NodeID {
	var id identity.NodeID
	copy(id[:], fmt.Sprintf("node-%027d", i))
	return id
}

func TestValidName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"lan", true}, {"a", true}, {"lan-party.2026_x", true}, {"0day", true},
		{strings.Repeat("a", 32), true}, {strings.Repeat("a", 33), false},
		{"", false}, {"-lan", false}, {".lan", false}, {"lan.", false}, {"lan_", false},
		{"a..b", false}, {"LAN", false}, {"lan party", false}, {"lan/x", false}, {"lan*", false}, {"é", false},
	} {
		err := ValidName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrBadName) {
			t.Errorf("ValidName(%q) = %v, not ErrBadName", tc.name, err)
		}
	}
}

func TestNew(t *testing.T) {
	owner := nodeID(1)
	p, err := New("lan", owner, t0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Validate(); err != nil {
		t.Fatalf("new party invalid: %v", err)
	}
	if p.Owner != owner || len(p.Members) != 1 || p.Members[0].NodeID != owner {
		t.Fatalf("owner/members = %v %+v", p.Owner, p.Members)
	}
	m := p.Members[0]
	if m.IPv4 != p.Prefix4.Addr().Next() || m.IPv6.As16()[15] != 1 || !p.Prefix6.Contains(m.IPv6) {
		t.Fatalf("owner addresses %v %v in %v %v", m.IPv4, m.IPv6, p.Prefix4, p.Prefix6)
	}
	// Vector (computed independently from the formula in docs/protocol.md).
	if p.Prefix4.String() != "100.110.0.0/24" || p.Prefix6.String() != "fdaf:bde2:460::/64" {
		t.Fatalf("lan's prefixes = %v %v", p.Prefix4, p.Prefix6)
	}
	// The same name gives the same subnets on every server.
	q, _ := New("lan", nodeID(2), t0, nil)
	if q.Prefix4 != p.Prefix4 || q.Prefix6 != p.Prefix6 {
		t.Fatalf("same name, different prefixes: %v %v / %v %v", p.Prefix4, p.Prefix6, q.Prefix4, q.Prefix6)
	}

	for _, tc := range []struct {
		name  string
		taken int // how many subnets from the hashed one on are taken
		want  int // offset of the chosen subnet from the hashed one
	}{
		{"free", 0, 0}, {"one taken", 1, 1}, {"five taken", 5, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			taken := map[netip.Prefix]bool{}
			cur := p.Prefix4
			for range tc.taken {
				taken[cur] = true
				cur = nextSubnet(cur)
			}
			q, err := New("lan", owner, t0, func(x netip.Prefix) bool { return taken[x] })
			if err != nil {
				t.Fatal(err)
			}
			want := p.Prefix4
			for range tc.want {
				want = nextSubnet(want)
			}
			if q.Prefix4 != want {
				t.Fatalf("Prefix4 = %v, want %v", q.Prefix4, want)
			}
		})
	}
	// Probing wraps from the last /24 of the range to the first.
	last := netip.MustParsePrefix("100.127.255.0/24")
	if got := nextSubnet(last); got != netip.MustParsePrefix("100.64.0.0/24") {
		t.Fatalf("after the last subnet: %v", got)
	}
	if _, err := New("lan", owner, t0, func(netip.Prefix) bool { return true }); err == nil {
		t.Fatal("New with every subnet taken succeeded")
	}
	if _, err := New("Bad Name", owner, t0, nil); !errors.Is(err, ErrBadName) {
		t.Fatalf("New with a bad name = %v", err)
	}
	// Names spread over the range.
	seen := map[netip.Prefix]bool{}
	for i := range 200 {
		q, _ := New(fmt.Sprintf("p%d", i), owner, t0, nil)
		seen[q.Prefix4] = true
		if !CGNAT.Contains(q.Prefix4.Addr()) {
			t.Fatalf("%v outside %v", q.Prefix4, CGNAT)
		}
	}
	if len(seen) < 190 {
		t.Fatalf("200 names share %d subnets", len(seen))
	}
}

func nextSubnet(p netip.Prefix) netip.Prefix {
	for i := range uint32(subnets) {
		if prefix4At(i) == p {
			return prefix4At(i + 1)
		}
	}
	panic("not a subnet")
}

func host(a netip.Addr) byte { return a.As4()[3] }

func TestAddRemove(t *testing.T) {
	type step struct {
		add, remove int // node numbers; 0: none
		wantHost    byte
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"sequential", []step{{add: 2, wantHost: 2}, {add: 3, wantHost: 3}, {add: 4, wantHost: 4}}},
		{"idempotent", []step{{add: 2, wantHost: 2}, {add: 3, wantHost: 3}, {add: 2, wantHost: 2}, {add: 4, wantHost: 4}}},
		{"lowest free reused", []step{{add: 2, wantHost: 2}, {add: 3, wantHost: 3}, {add: 4, wantHost: 4}, {remove: 2}, {add: 5, wantHost: 2}, {add: 6, wantHost: 5}}},
		{"stable after others leave", []step{{add: 2, wantHost: 2}, {add: 3, wantHost: 3}, {add: 4, wantHost: 4}, {remove: 2}, {remove: 3}, {add: 4, wantHost: 4}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, _ := New("lan", nodeID(1), t0, nil)
			for i, s := range tc.steps {
				if s.remove != 0 {
					if !p.Remove(nodeID(s.remove)) {
						t.Fatalf("step %d: Remove(%d) = false", i, s.remove)
					}
					continue
				}
				m, err := p.Add(nodeID(s.add), t0.Add(time.Duration(i)*time.Minute))
				if err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if host(m.IPv4) != s.wantHost || m.IPv6.As16()[15] != s.wantHost {
					t.Fatalf("step %d: node %d got %v %v, want host %d", i, s.add, m.IPv4, m.IPv6, s.wantHost)
				}
				if err := p.Validate(); err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
			}
		})
	}
}

func TestFullAndOwnership(t *testing.T) {
	p, _ := New("lan", nodeID(1), t0, nil)
	for i := 2; i <= MaxMembers; i++ {
		if _, err := p.Add(nodeID(i), t0.Add(time.Duration(i)*time.Second)); err != nil {
			t.Fatalf("member %d: %v", i, err)
		}
	}
	if _, err := p.Add(nodeID(1000), t0); !errors.Is(err, ErrPartyFull) {
		t.Fatalf("Add to a full party = %v", err)
	}
	if _, err := p.Add(nodeID(7), t0); err != nil {
		t.Fatalf("re-Add of a member of a full party = %v", err)
	}
	seen := map[byte]bool{}
	for _, m := range p.Members {
		h := host(m.IPv4)
		if h == 0 || h == 255 || seen[h] {
			t.Fatalf("host %d given badly", h)
		}
		seen[h] = true
	}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	// The owner leaving hands the party to the oldest remaining member.
	if !p.Remove(nodeID(1)) || p.Owner != nodeID(2) {
		t.Fatalf("owner after the owner left = %v", p.Owner.Short())
	}
	if p.Remove(nodeID(1)) {
		t.Fatal("Remove of a non-member = true")
	}
	if m, err := p.Add(nodeID(1000), t0); err != nil || host(m.IPv4) != 1 {
		t.Fatalf("Add after a leave = %v, %v; want .1", m.IPv4, err)
	}
}

func TestValidate(t *testing.T) {
	good := func() *Party {
		p, _ := New("lan", nodeID(1), t0, nil)
		p.Add(nodeID(2), t0)
		return p
	}
	for _, tc := range []struct {
		name   string
		mutate func(p *Party)
	}{
		{"bad name", func(p *Party) { p.Name = "X" }},
		{"v4 prefix outside", func(p *Party) { p.Prefix4 = netip.MustParsePrefix("10.0.0.0/24") }},
		{"v4 prefix /16", func(p *Party) { p.Prefix4 = netip.MustParsePrefix("100.64.0.0/16") }},
		{"v4 prefix unmasked", func(p *Party) { p.Prefix4 = netip.PrefixFrom(p.Prefix4.Addr().Next(), 24) }},
		{"v6 prefix not ULA", func(p *Party) { p.Prefix6 = netip.MustParsePrefix("2001:db8::/64") }},
		{"v6 prefix /48", func(p *Party) { p.Prefix6 = netip.PrefixFrom(p.Prefix6.Addr(), 48) }},
		{"duplicate id", func(p *Party) { p.Members[1].NodeID = p.Members[0].NodeID }},
		{"duplicate ip", func(p *Party) { p.Members[1].IPv4, p.Members[1].IPv6 = p.Members[0].IPv4, p.Members[0].IPv6 }},
		{"ip outside", func(p *Party) { p.Members[1].IPv4 = netip.MustParseAddr("100.99.0.2") }},
		{"broadcast", func(p *Party) { p.Members[1].IPv4 = bcast(p) }},
		{"v6 mismatch", func(p *Party) { p.Members[1].IPv6 = p.Members[0].IPv6 }},
		{"owner not member", func(p *Party) { p.Owner = nodeID(9) }},
		{"zero member", func(p *Party) { p.Members[1].NodeID = identity.NodeID{} }},
		{"no owner", func(p *Party) { p.Owner = identity.NodeID{} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := good()
			if err := p.Validate(); err != nil {
				t.Fatal(err)
			}
			tc.mutate(p)
			if err := p.Validate(); err == nil {
				t.Fatalf("Validate accepted %+v", p)
			}
		})
	}
	empty := good()
	empty.Members = nil
	if err := empty.Validate(); err != nil {
		t.Fatalf("a party being deleted (no members) = %v", err)
	}
}

func bcast(p *Party) netip.Addr {
	a := p.Prefix4.Addr().As4()
	a[3] = 255
	return netip.AddrFrom4(a)
}

func TestJSONRoundTrip(t *testing.T) {
	p, _ := New("lan", nodeID(1), t0, nil)
	p.Add(nodeID(2), t0.Add(time.Minute))
	p.Members[1].Online = true
	p.Members[1].LastSeen = t0.Add(time.Hour)
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var q Party
	if err := json.Unmarshal(b, &q); err != nil {
		t.Fatal(err)
	}
	if err := q.Validate(); err != nil {
		t.Fatal(err)
	}
	b2, _ := json.Marshal(&q)
	if string(b) != string(b2) {
		t.Fatalf("round trip changed the party:\n%s\n%s", b, b2)
	}
	if strings.Contains(string(b), `"lastSeen":"0001`) {
		t.Fatalf("zero lastSeen encoded: %s", b)
	}
}

// FuzzPartyJSON: whatever decodes and validates encodes again to a party that validates
// the same, and Add/Remove on it keep it valid.
func FuzzPartyJSON(f *testing.F) {
	p, _ := New("lan", nodeID(1), t0, nil)
	p.Add(nodeID(2), t0)
	b, _ := json.Marshal(p)
	f.Add(b)
	f.Add([]byte(`{"name":"x","members":[]}`))
	f.Add([]byte(`{"name":"lan","owner":"pl","prefix4":"100.64.0.0/24","prefix6":"fd00::/64","members":[{"nodeID":"x"}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var p Party
		if json.Unmarshal(data, &p) != nil || p.Validate() != nil {
			return
		}
		b, err := json.Marshal(&p)
		if err != nil {
			t.Fatal(err)
		}
		var q Party
		if err := json.Unmarshal(b, &q); err != nil {
			t.Fatal(err)
		}
		if err := q.Validate(); err != nil {
			t.Fatalf("re-decoded party invalid: %v", err)
		}
		if len(q.Members) == 0 {
			return
		}
		if _, err := q.Add(nodeID(99999), t0); err != nil && !errors.Is(err, ErrPartyFull) {
			t.Fatal(err)
		}
		q.Remove(q.Owner)
		if err := q.Validate(); err != nil {
			t.Fatalf("after Add and Remove: %v", err)
		}
	})
}
