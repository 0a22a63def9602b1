package netmon_test

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/netmon"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// expect waits for a change report, or checks there is none.
func expect(t *testing.T, m *netmon.Monitor, want bool, within time.Duration) {
	t.Helper()
	select {
	case <-m.Changes():
		if !want {
			t.Fatal("a change was reported when nothing changed")
		}
	case <-time.After(within):
		if want {
			t.Fatalf("no change reported within %v", within)
		}
	}
}

// TestPolling checks the polling fallback: a new address is a change, the same list
// is not, and a burst is one report.
func TestPolling(t *testing.T) {
	var mu sync.Mutex
	addrs := []netip.Prefix{netip.MustParsePrefix("192.0.2.1/24")}
	set := func(p ...netip.Prefix) {
		mu.Lock()
		addrs = p
		mu.Unlock()
	}
	m, err := netmon.New(netmon.Config{ForcePoll: true, Poll: 10 * time.Millisecond, Debounce: 50 * time.Millisecond,
		Addrs: func() ([]netip.Prefix, error) {
			mu.Lock()
			defer mu.Unlock()
			return addrs, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	expect(t, m, false, 200*time.Millisecond)
	set(netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("198.51.100.7/24"))
	time.Sleep(20 * time.Millisecond)
	set(netip.MustParsePrefix("198.51.100.7/24"))
	expect(t, m, true, 2*time.Second)
	expect(t, m, false, 200*time.Millisecond) // the burst was one report
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m.Close() // idempotent
}

// TestNetlink watches a kernel-lab host's namespace: adding and removing an address
// and taking a link down are each reported, and nothing is reported when all is quiet.
func TestNetlink(t *testing.T) {
	netlabtest.Need(t)
	l := netlabtest.Start(t, netlab.Config{Sites: []netlab.SiteConfig{{Name: "pub", Kind: netlab.KindNone}}})
	h := l.Site("pub").Host()
	var m *netmon.Monitor
	if err := h.Do(func() error {
		var err error
		m, err = netmon.New(netmon.Config{Debounce: 50 * time.Millisecond})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx := context.Background()
	expect(t, m, false, 300*time.Millisecond)
	for _, step := range [][]string{
		{"ip", "addr", "add", "192.0.2.99/32", "dev", "lo"},
		{"ip", "addr", "del", "192.0.2.99/32", "dev", "lo"},
		{"ip", "link", "add", "v9a", "type", "veth", "peer", "name", "v9b"},
		{"ip", "link", "del", "v9a"},
	} {
		start := time.Now()
		if out, err := h.Run(ctx, step[0], step[1:]...); err != nil {
			t.Fatalf("%v: %v %s", step, err, out)
		}
		expect(t, m, true, 2*time.Second)
		t.Logf("%v: reported after %v", step, time.Since(start).Round(time.Millisecond))
	}
	// A change in another namespace (the host's) is not this one's.
	expect(t, m, false, 300*time.Millisecond)
}
