package stun

import (
	"net/netip"
	"runtime"
	"testing"
	"time"
)

func addr4(i uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
}

func (l *limiter) used() int {
	n := 0
	for i := range l.sets {
		for _, e := range l.sets[i] {
			if e.seen != 0 {
				n++
			}
		}
	}
	return n
}

// TestLimiterBounded floods the limiter from a million sources: it tracks no more than its
// capacity, its memory does not grow and it never allocates.
func TestLimiterBounded(t *testing.T) {
	l := newLimiter(RateLimit{Rate: 1, Burst: 2, ChangeCost: 1, MaxSources: 1000})
	if c := l.capacity(); c < 1000 || c > 2048 {
		t.Fatalf("capacity %d for MaxSources 1000", c)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const n = 1_000_000
	for i := range uint32(n) {
		l.allow(addr4(i+1), 1, int64(i))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if used := l.used(); used > l.capacity() || used < l.capacity()/2 {
		t.Errorf("%d sources tracked, capacity %d", used, l.capacity())
	}
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 256<<10 {
		t.Errorf("heap grew by %d bytes over %d sources", grew, n)
	}
	var i uint32
	if allocs := testing.AllocsPerRun(1000, func() { i++; l.allow(addr4(i), 1, int64(n+i)) }); allocs != 0 {
		t.Errorf("%v allocations per call", allocs)
	}
}

// TestLimiterEviction checks that a full set gives the place of its least recently seen
// source to a new one, so an evicted source starts over with a full bucket while a recent
// one keeps its debt.
func TestLimiterEviction(t *testing.T) {
	l := newLimiter(RateLimit{Rate: 1e-9, Burst: 2, ChangeCost: 1, MaxSources: limiterWays}) // one set
	now := int64(0)
	tick := func() int64 { now += int64(time.Millisecond); return now }
	drain := func(a netip.Addr) {
		for l.allow(a, 1, tick()) {
		}
	}
	old, recent := addr4(1), addr4(2)
	drain(old)
	for i := range uint32(limiterWays - 2) {
		l.allow(addr4(100+i), 1, tick())
	}
	drain(recent)
	if l.used() != limiterWays {
		t.Fatalf("set holds %d sources, want %d", l.used(), limiterWays)
	}
	l.allow(addr4(999), 1, tick()) // evicts old, the least recently seen
	if !l.allow(old, 1, tick()) {
		t.Error("evicted source did not start over")
	}
	if l.allow(recent, 1, tick()) {
		t.Error("recently seen source lost its debt")
	}
	if l.used() != limiterWays {
		t.Errorf("set holds %d sources, want %d", l.used(), limiterWays)
	}
}

// TestLimiterRefill checks the token arithmetic against the clock.
func TestLimiterRefill(t *testing.T) {
	l := newLimiter(RateLimit{Rate: 10, Burst: 5, ChangeCost: 1, MaxSources: 16})
	a := addr4(7)
	for i := range 5 {
		if !l.allow(a, 1, 0) {
			t.Fatalf("request %d refused within the burst", i)
		}
	}
	if l.allow(a, 1, 0) {
		t.Fatal("allowed beyond the burst")
	}
	if l.allow(a, 1, int64(90*time.Millisecond)) {
		t.Error("allowed before a token was earned (10/s: one per 100ms)")
	}
	if !l.allow(a, 1, int64(100*time.Millisecond)) {
		t.Error("refused after a token was earned")
	}
	// An hour of silence refills to the burst, no more.
	hour := int64(time.Hour)
	for i := range 5 {
		if !l.allow(a, 1, hour) {
			t.Fatalf("request %d refused after refill", i)
		}
	}
	if l.allow(a, 1, hour) {
		t.Error("refilled beyond the burst")
	}
	if l.allow(addr4(8), 6, 0) {
		t.Error("a cost above the burst was allowed")
	}
}
