package detect

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"

	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
)

// TestBindingLifetime: against an emulated NAT whose idle mappings last 600 ms, the
// measurement lands within its resolution of that.
func TestBindingLifetime(t *testing.T) {
	const lifetime = 600 * time.Millisecond
	w := newWorld(t, 3)
	r := w.net.AddNAT(natlab.NATConfig{Name: "home", PublicIP: netip.MustParseAddr("198.51.100.1"), MappingTimeout: lifetime,
		Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD}})
	d := w.detector(r.AddHost("peer", netip.MustParseAddr("192.168.1.2")))
	defer d.Close()
	if _, err := d.Detect(context.Background(), Options{}); err != nil {
		t.Fatal(err)
	}
	res := 50 * time.Millisecond
	got, err := d.MeasureBindingLifetime(context.Background(), LifetimeOptions{Start: 100 * time.Millisecond, Max: 1600 * time.Millisecond, Resolution: res})
	if err != nil {
		t.Fatal(err)
	}
	if got > lifetime || got < lifetime-2*res {
		t.Errorf("measured %v, NAT keeps idle mappings %v", got, lifetime)
	}
	if p, _ := d.LocalProfile(); time.Duration(p.BindingLifetime) != got {
		t.Errorf("profile's binding lifetime %v, want %v", p.BindingLifetime, got)
	}
}

// TestBindingLifetimeKernelLab measures a real kernel NAT. It takes minutes, so it is
// opt-in: PEERLINK_LONG_TESTS=1.
func TestBindingLifetimeKernelLab(t *testing.T) {
	if os.Getenv("PEERLINK_LONG_TESTS") == "" {
		t.Skip("long test: set PEERLINK_LONG_TESTS=1 to measure a kernel NAT's binding lifetime")
	}
	l := netlabtest.Start(t, netlab.Config{Sites: []netlab.SiteConfig{{Kind: netlab.KindPortRestricted}}})
	d := labDetector(l.Sites[0].Host(), labObservers(t, l))
	defer d.Close()
	got, err := d.MeasureBindingLifetime(context.Background(), LifetimeOptions{Start: 10 * time.Second, Max: 320 * time.Second, Resolution: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel port-restricted NAT: idle mappings last about %v", got)
	if got < 10*time.Second {
		t.Errorf("measured %v: shorter than any kernel UDP timeout", got)
	}
}
