package natcache

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/nat"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func node(t testing.TB) identity.NodeID {
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id.NodeID()
}

func profile(port uint16) nat.Profile {
	return nat.Profile{Mapping: nat.MappingEI, Filtering: nat.FilteringHD, Allocation: nat.AllocationPP,
		PublicIP: netip.MustParseAddr("203.0.113.1"), PublicPort: port}
}

// countingFetcher returns profile(port) with port incremented on every call.
type countingFetcher struct {
	calls atomic.Int32
	fail  atomic.Bool
	gate  chan struct{} // when set, each call waits for it
}

var errGone = errors.New("gone")

func (f *countingFetcher) FetchProfile(ctx context.Context, n identity.NodeID) (nat.Profile, error) {
	c := f.calls.Add(1)
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return nat.Profile{}, ctx.Err()
		}
	}
	if f.fail.Load() {
		return nat.Profile{}, errGone
	}
	return profile(uint16(1000 + c)), nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestLifecycle(t *testing.T) {
	fc := clock.NewFake(time.Unix(1e9, 0))
	f := &countingFetcher{}
	c := New(Config{Clock: fc, Fetcher: f, MaxStale: time.Minute})
	defer c.Close()
	n := node(t)
	if _, _, err := c.Get(n); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get empty = %v", err)
	}
	c.Put(n, profile(1))
	fc.Advance(299 * time.Second)
	if p, stale, err := c.Get(n); err != nil || stale || p.PublicPort != 1 {
		t.Fatalf("Get within TTL = %v stale=%v %v", p.PublicPort, stale, err)
	}
	fc.Advance(time.Second) // 300 s: the default TTL has passed
	p, stale, err := c.Get(n)
	if err != nil || !stale || p.PublicPort != 1 {
		t.Fatalf("Get after TTL = %v stale=%v %v, want the old profile, stale", p.PublicPort, stale, err)
	}
	// The stale hit refreshed the entry in the background.
	waitFor(t, "background refresh", func() bool {
		p, stale, _ := c.Get(n)
		return !stale && p.PublicPort == 1001
	})
	if f.calls.Load() != 1 {
		t.Fatalf("fetcher called %d times, want 1", f.calls.Load())
	}
	// Past TTL + MaxStale without a refresh, the entry is gone.
	f.fail.Store(true)
	fc.Advance(300*time.Second + time.Minute)
	if _, _, err := c.Get(n); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get past MaxStale = %v", err)
	}
	st := c.Stats()
	if st.Size != 0 || st.Hits < 2 || st.StaleHits < 1 || st.Misses != 2 || st.Evictions != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestPutTTLAndInvalidate(t *testing.T) {
	fc := clock.NewFake(time.Unix(1e9, 0))
	c := New(Config{Clock: fc})
	defer c.Close()
	n := node(t)
	c.PutTTL(n, profile(7), 600*time.Second)
	fc.Advance(599 * time.Second)
	if _, stale, err := c.Get(n); err != nil || stale {
		t.Fatalf("custom TTL entry at 599s: stale=%v %v", stale, err)
	}
	c.Invalidate(n)
	if _, _, err := c.Get(n); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Invalidate = %v", err)
	}
	// Without a fetcher a stale hit is still served, and Fetch says why it cannot load.
	c.PutTTL(n, profile(8), time.Second)
	fc.Advance(2 * time.Second)
	if p, stale, err := c.Get(n); err != nil || !stale || p.PublicPort != 8 {
		t.Fatalf("stale without fetcher = %v %v %v", p.PublicPort, stale, err)
	}
	if _, err := c.Fetch(context.Background(), n); !errors.Is(err, ErrNoFetcher) {
		t.Fatalf("Fetch without fetcher = %v", err)
	}
}

// TestStaleWhileRevalidate: many stale hits during one slow refresh start one fetch, and
// a failed refresh is retried only after RetryAfter.
func TestStaleWhileRevalidate(t *testing.T) {
	fc := clock.NewFake(time.Unix(1e9, 0))
	f := &countingFetcher{gate: make(chan struct{})}
	c := New(Config{Clock: fc, Fetcher: f, TTL: time.Minute, RetryAfter: 10 * time.Second})
	defer c.Close()
	n := node(t)
	c.Put(n, profile(1))
	fc.Advance(time.Minute)
	for range 100 {
		if _, stale, err := c.Get(n); err != nil || !stale {
			t.Fatalf("stale Get = %v %v", stale, err)
		}
	}
	waitFor(t, "one fetch started", func() bool { return f.calls.Load() == 1 })
	f.fail.Store(true)
	close(f.gate)
	waitFor(t, "refresh to fail", func() bool { c.fmu.Lock(); defer c.fmu.Unlock(); return len(c.flights) == 0 })
	c.Get(n)
	if f.calls.Load() != 1 {
		t.Fatalf("refresh retried at once after failing: %d calls", f.calls.Load())
	}
	fc.Advance(10 * time.Second)
	f.fail.Store(false)
	c.Get(n)
	waitFor(t, "retry after RetryAfter", func() bool { p, stale, _ := c.Get(n); return !stale && p.PublicPort == 1002 })
}

func TestFetch(t *testing.T) {
	f := &countingFetcher{gate: make(chan struct{})}
	c := New(Config{Fetcher: f})
	defer c.Close()
	n := node(t)
	var wg sync.WaitGroup
	results := make([]nat.Profile, 10)
	for i := range results {
		wg.Go(func() {
			p, err := c.Fetch(context.Background(), n)
			if err != nil {
				t.Error(err)
			}
			results[i] = p
		})
	}
	waitFor(t, "fetch started", func() bool { return f.calls.Load() == 1 })
	time.Sleep(10 * time.Millisecond) // let the other callers join the flight
	close(f.gate)
	wg.Wait()
	if f.calls.Load() != 1 {
		t.Fatalf("10 concurrent Fetches made %d fetcher calls, want 1", f.calls.Load())
	}
	for _, p := range results {
		if p.PublicPort != 1001 {
			t.Fatalf("Fetch returned port %d", p.PublicPort)
		}
	}
	// Now cached: no further fetch.
	if p, err := c.Fetch(context.Background(), n); err != nil || p.PublicPort != 1001 || f.calls.Load() != 1 {
		t.Fatalf("cached Fetch = %v, %v, %d calls", p.PublicPort, err, f.calls.Load())
	}
	// Errors from the fetcher come through.
	f.fail.Store(true)
	if _, err := c.Fetch(context.Background(), node(t)); !errors.Is(err, errGone) {
		t.Fatalf("failed Fetch = %v", err)
	}
	// A caller that gives up gets its context's error.
	blocked := &countingFetcher{gate: make(chan struct{})}
	c2 := New(Config{Fetcher: blocked})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := c2.Fetch(ctx, n); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Fetch with expired context = %v", err)
	}
	c2.Close() // cancels the fetch still waiting on its gate
}

func TestBounded(t *testing.T) {
	fc := clock.NewFake(time.Unix(1e9, 0))
	c := New(Config{Clock: fc, MaxEntries: 100})
	defer c.Close()
	hot := node(t)
	c.Put(hot, profile(1))
	for i := range 150 {
		fc.Advance(time.Millisecond)
		if _, _, err := c.Get(hot); err != nil {
			t.Fatalf("hot entry evicted after %d inserts", i)
		}
		fc.Advance(time.Millisecond)
		c.Put(node(t), profile(2))
	}
	if st := c.Stats(); st.Size != 100 || st.Evictions != 51 {
		t.Fatalf("stats %+v, want size 100 and 51 evictions", st)
	}
}

func TestPrewarm(t *testing.T) {
	var inFlight, maxInFlight atomic.Int32
	fail := map[identity.NodeID]bool{}
	nodes := make([]identity.NodeID, 40)
	for i := range nodes {
		nodes[i] = node(t)
		if i%10 == 0 {
			fail[nodes[i]] = true
		}
	}
	f := FetcherFunc(func(ctx context.Context, n identity.NodeID) (nat.Profile, error) {
		cur := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := maxInFlight.Load()
			if cur <= m || maxInFlight.CompareAndSwap(m, cur) {
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
		if fail[n] {
			return nat.Profile{}, errGone
		}
		return profile(9), nil
	})
	c := New(Config{Fetcher: f, PrewarmConcurrency: 4})
	defer c.Close()
	err := c.Prewarm(context.Background(), nodes)
	if !errors.Is(err, errGone) {
		t.Fatalf("Prewarm = %v, want the failures joined", err)
	}
	if m := maxInFlight.Load(); m > 4 || m < 2 {
		t.Fatalf("max fetches in flight %d, want 2..4", m)
	}
	for i, n := range nodes {
		_, _, err := c.Get(n)
		if (err == nil) == fail[n] {
			t.Fatalf("node %d: Get = %v after Prewarm", i, err)
		}
	}
}

func BenchmarkCacheHit(b *testing.B) {
	c := New(Config{})
	defer c.Close()
	n := node(b)
	c.Put(n, profile(1))
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := c.Get(n); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkCacheHitParallel(b *testing.B) {
	c := New(Config{})
	defer c.Close()
	nodes := make([]identity.NodeID, 1000)
	for i := range nodes {
		nodes[i] = node(b)
		c.Put(nodes[i], profile(1))
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, _, err := c.Get(nodes[i%len(nodes)]); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}
