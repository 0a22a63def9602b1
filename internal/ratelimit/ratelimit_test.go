package ratelimit

import (
	"net/netip"
	"runtime"
	"testing"
	"time"
)

func addr4(i uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
}

func (t *Table) used() int {
	n := 0
	for i := range t.sets {
		for _, e := range t.sets[i] {
			if e.seen != 0 {
				n++
			}
		}
	}
	return n
}

// TestBounded floods the table from a million sources: it tracks no more than its
// capacity, its memory does not grow and it never allocates.
func TestBounded(t *testing.T) {
	l := New(1, 2, 1000)
	if c := l.Capacity(); c < 1000 || c > 2048 {
		t.Fatalf("capacity %d for 1000 sources", c)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const n = 1_000_000
	for i := range uint32(n) {
		l.Allow(addr4(i+1), 1, int64(i))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if used := l.used(); used > l.Capacity() || used < l.Capacity()/2 {
		t.Errorf("%d sources tracked, capacity %d", used, l.Capacity())
	}
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 256<<10 {
		t.Errorf("heap grew by %d bytes over %d sources", grew, n)
	}
	var i uint32
	if allocs := testing.AllocsPerRun(1000, func() { i++; l.Allow(addr4(i), 1, int64(n+i)) }); allocs != 0 {
		t.Errorf("%v allocations per call", allocs)
	}
}

// TestEviction checks that a full set gives the place of its least recently seen source
// to a new one, so an evicted source starts over with a full bucket while a recent one
// keeps its debt.
func TestEviction(t *testing.T) {
	l := New(1e-9, 2, ways) // one set
	now := int64(0)
	tick := func() int64 { now += int64(time.Millisecond); return now }
	drain := func(a netip.Addr) {
		for l.Allow(a, 1, tick()) {
		}
	}
	old, recent := addr4(1), addr4(2)
	drain(old)
	for i := range uint32(ways - 2) {
		l.Allow(addr4(100+i), 1, tick())
	}
	drain(recent)
	if l.used() != ways {
		t.Fatalf("set holds %d sources, want %d", l.used(), ways)
	}
	l.Allow(addr4(999), 1, tick()) // evicts old, the least recently seen
	if !l.Allow(old, 1, tick()) {
		t.Error("evicted source did not start over")
	}
	if l.Allow(recent, 1, tick()) {
		t.Error("recently seen source lost its debt")
	}
	if l.used() != ways {
		t.Errorf("set holds %d sources, want %d", l.used(), ways)
	}
}

// TestRefill checks the token arithmetic against the clock.
func TestRefill(t *testing.T) {
	l := New(10, 5, 16)
	a := addr4(7)
	for i := range 5 {
		if !l.Allow(a, 1, 0) {
			t.Fatalf("request %d refused within the burst", i)
		}
	}
	if l.Allow(a, 1, 0) {
		t.Fatal("allowed beyond the burst")
	}
	if l.Allow(a, 1, int64(90*time.Millisecond)) {
		t.Error("allowed before a token was earned (10/s: one per 100ms)")
	}
	if !l.Allow(a, 1, int64(100*time.Millisecond)) {
		t.Error("refused after a token was earned")
	}
	// An hour of silence refills to the burst, no more.
	hour := int64(time.Hour)
	for i := range 5 {
		if !l.Allow(a, 1, hour) {
			t.Fatalf("request %d refused after refill", i)
		}
	}
	if l.Allow(a, 1, hour) {
		t.Error("refilled beyond the burst")
	}
	if l.Allow(addr4(8), 6, 0) {
		t.Error("a cost above the burst was allowed")
	}
}

// TestKey checks which addresses share a bucket: an IPv4 address and its IPv4-mapped
// IPv6 form do, as do two addresses of one IPv6 /64; neighbouring IPv4 addresses and
// other /64s do not.
func TestKey(t *testing.T) {
	for _, tt := range []struct {
		a, b string
		same bool
	}{
		{"192.0.2.1", "::ffff:192.0.2.1", true},
		{"192.0.2.1", "192.0.2.2", false},
		{"2001:db8:1:2::1", "2001:db8:1:2:ffff::9", true},
		{"2001:db8:1:2::1", "2001:db8:1:3::1", false},
		{"0.0.0.0", "::", false},
	} {
		a, b := netip.MustParseAddr(tt.a), netip.MustParseAddr(tt.b)
		a0, a1 := Key(a)
		b0, b1 := Key(b)
		if same := a0 == b0 && a1 == b1; same != tt.same {
			t.Errorf("Key(%v) == Key(%v): %v, want %v", a, b, same, tt.same)
		}
		l := New(1e-9, 1, 64)
		l.Allow(a, 1, 0)
		if got := !l.Allow(b, 1, 1); got != tt.same {
			t.Errorf("%v drained by %v: %v, want %v", b, a, got, tt.same)
		}
	}
}
