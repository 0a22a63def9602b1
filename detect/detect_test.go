package detect

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/stun"
	"peerlink/stun/stuntest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	stunIP1 = netip.MustParseAddr("203.0.113.10")
	stunIP2 = netip.MustParseAddr("203.0.113.11")
	obsIP   = netip.MustParseAddr("203.0.113.20")
)

// world is an emulated internet with an RFC 5780 STUN server (two IPs) and a single-IP
// observer.
type world struct {
	net       *natlab.Network
	observers []string
}

func newWorld(t *testing.T, seed uint64) *world {
	t.Helper()
	n := natlab.New(natlab.Config{Seed: seed})
	t.Cleanup(func() { n.Close() })
	w := &world{net: n}
	start := func(h *natlab.Host, cfg stun.Config) {
		cfg.Net = h
		s, err := stun.Listen(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- s.Serve(context.Background()) }()
		t.Cleanup(func() { s.Close(); <-done })
	}
	start(n.AddPublicHost("stun", stunIP1, stunIP2), stun.Config{Listen: stunIP1.String() + ":3478", AltIP: stunIP2, AltPort: 3479})
	start(n.AddPublicHost("observer", obsIP), stun.Config{Listen: obsIP.String() + ":3478"})
	w.observers = []string{stunIP1.String() + ":3478", obsIP.String() + ":3478"}
	return w
}

func (w *world) detector(h *natlab.Host) *Detector {
	return New(Config{
		Observers: w.observers,
		Net:       h,
		LocalIPs:  func() ([]netip.Addr, error) { return h.Addrs(), nil },
	})
}

// TestDetectAllTypes: the detector recovers every one of the 27 NATCracker types that
// the emulator is configured with, with high confidence.
func TestDetectAllTypes(t *testing.T) {
	for i, typ := range nat.AllTypes() {
		for _, delta := range []int{1, 3} {
			if delta != 1 && typ.Allocation != nat.AllocationPC {
				continue
			}
			t.Run(fmt.Sprintf("%s/delta%d", typ, delta), func(t *testing.T) {
				t.Parallel()
				w := newWorld(t, uint64(i+1))
				r := w.net.AddNAT(natlab.NATConfig{Name: "home", Type: typ, PublicIP: netip.MustParseAddr("198.51.100.1"), Delta: delta})
				h := r.AddHost("peer", netip.MustParseAddr("192.168.1.2"))
				d := w.detector(h)
				defer d.Close()
				p, err := d.Detect(context.Background(), Options{})
				if err != nil {
					t.Fatal(err)
				}
				if got := p.Type(); got != typ {
					t.Fatalf("detected %s, want %s (profile %v)", got, typ, p)
				}
				if typ.Allocation == nat.AllocationPC && p.PortDelta != delta {
					t.Errorf("port delta %d, want %d", p.PortDelta, delta)
				}
				if p.PublicIP != r.PublicIP() || p.Open || p.UDPBlocked {
					t.Errorf("public %v open %v blocked %v, want %v behind a NAT", p.PublicIP, p.Open, p.UDPBlocked, r.PublicIP())
				}
				if p.Confidence != nat.ConfidenceHigh {
					rep, _ := d.LastReport()
					t.Errorf("confidence %v, want high (notes %q)", p.Confidence, rep.Notes)
				}
			})
		}
	}
}

func TestDetectOpenHost(t *testing.T) {
	w := newWorld(t, 1)
	h := w.net.AddPublicHost("server", netip.MustParseAddr("203.0.113.50"))
	d := w.detector(h)
	defer d.Close()
	p, err := d.Detect(context.Background(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !p.Open || p.Classic() != nat.ClassicOpen || p.Type() != (nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringEI, Allocation: nat.AllocationPP}) {
		t.Errorf("public host profiled as %v (%s)", p, p.Type())
	}
}

func TestDetectFirewalledHost(t *testing.T) {
	w := newWorld(t, 1)
	fw := w.net.AddNAT(natlab.NATConfig{Name: "fw", Firewall: true, Type: nat.Type{Filtering: nat.FilteringPD}})
	h := fw.AddHost("server", netip.MustParseAddr("203.0.113.60"))
	d := w.detector(h)
	defer d.Close()
	p, err := d.Detect(context.Background(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !p.Open || p.Filtering != nat.FilteringPD || p.Classic() != nat.ClassicFirewalled {
		t.Errorf("firewalled public host profiled as %v", p)
	}
}

func TestDetectUDPBlocked(t *testing.T) {
	w := newWorld(t, 1)
	r := w.net.AddNAT(natlab.NATConfig{Name: "fw", PublicIP: netip.MustParseAddr("198.51.100.1"), BlockUDP: true})
	d := w.detector(r.AddHost("peer", netip.MustParseAddr("192.168.1.2")))
	defer d.Close()
	p, err := d.Detect(context.Background(), Options{Timeout: 300 * time.Millisecond})
	if !errors.Is(err, ErrDetectionTimeout) || !p.UDPBlocked {
		t.Fatalf("Detect = %v, %v; want UDPBlocked and ErrDetectionTimeout", p, err)
	}
	if _, err := d.LocalProfile(); !errors.Is(err, ErrNotDetected) {
		t.Errorf("a failed detection was cached: LocalProfile err = %v", err)
	}
}

// TestDetectCGNAT: behind two NATs the detector sees the composition: the outer
// address, and the stricter of the two behaviours.
func TestDetectCGNAT(t *testing.T) {
	w := newWorld(t, 1)
	cgn := w.net.AddNAT(natlab.NATConfig{Name: "cgn", Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringEI, Allocation: nat.AllocationRD}, PublicIP: netip.MustParseAddr("198.51.100.9")})
	home := w.net.AddNAT(natlab.NATConfig{Name: "home", Parent: cgn, Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP}, PublicIP: netip.MustParseAddr("100.64.0.2")})
	d := w.detector(home.AddHost("peer", netip.MustParseAddr("192.168.1.2")))
	defer d.Close()
	p, err := d.Detect(context.Background(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD}
	if p.Type() != want || p.PublicIP != cgn.PublicIP() {
		t.Errorf("behind CGNAT: %v (%s), want %s at %v", p, p.Type(), want, cgn.PublicIP())
	}
}

func TestDetectHairpinning(t *testing.T) {
	for _, on := range []bool{true, false} {
		t.Run(fmt.Sprint(on), func(t *testing.T) {
			w := newWorld(t, 1)
			r := w.net.AddNAT(natlab.NATConfig{Name: "home", Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP}, PublicIP: netip.MustParseAddr("198.51.100.1"), Hairpin: on})
			d := w.detector(r.AddHost("peer", netip.MustParseAddr("192.168.1.2")))
			defer d.Close()
			p, err := d.Detect(context.Background(), Options{})
			if err != nil {
				t.Fatal(err)
			}
			if p.Hairpinning != on {
				t.Errorf("hairpinning detected %v, NAT has %v", p.Hairpinning, on)
			}
		})
	}
}

// TestDetectSingleIPObservers: without an RFC 5780 server, two observers still give the
// mapping, filtering stays unknown, and confidence says so.
func TestDetectSingleIPObservers(t *testing.T) {
	w := newWorld(t, 1)
	r := w.net.AddNAT(natlab.NATConfig{Name: "home", Type: nat.Type{Mapping: nat.MappingPD, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD}, PublicIP: netip.MustParseAddr("198.51.100.1")})
	h := r.AddHost("peer", netip.MustParseAddr("192.168.1.2"))
	d := w.detector(h)
	defer d.Close()
	// The observer first; the RFC 5780 server's alternate address acts as a plain one.
	p, err := d.Detect(context.Background(), Options{Observers: []string{obsIP.String() + ":3478", stunIP2.String() + ":3479"}})
	if err != nil {
		t.Fatal(err)
	}
	if p.Mapping != nat.MappingPD || p.Filtering != nat.FilteringUnknown || p.Confidence == nat.ConfidenceHigh {
		t.Errorf("profile %v confidence %v; want pd mapping, unknown filtering, reduced confidence", p, p.Confidence)
	}
}

func TestDetectErrors(t *testing.T) {
	d := New(Config{})
	defer d.Close()
	if _, err := d.LocalProfile(); !errors.Is(err, ErrNotDetected) {
		t.Errorf("LocalProfile before detection: %v, want ErrNotDetected", err)
	}
	if _, err := d.Detect(context.Background(), Options{}); !errors.Is(err, ErrNoObservers) {
		t.Errorf("Detect without observers: %v, want ErrNoObservers", err)
	}
	if _, err := d.Detect(context.Background(), Options{Observers: []string{"no-port"}}); !errors.Is(err, ErrNoObservers) {
		t.Errorf("Detect with a malformed observer: %v, want ErrNoObservers", err)
	}
	d.Close()
	if _, err := d.Detect(context.Background(), Options{Observers: []string{"127.0.0.1:9"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Detect after Close: %v, want ErrClosed", err)
	}
}

// TestDetectLoopback runs on the host's real sockets against a real RFC 5780 server on
// 127.0.0.1 and 127.0.0.2: no NAT.
func TestDetectLoopback(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{RFC5780: true})
	d := New(Config{Observers: []string{s.UDPAddr(0).String()}})
	defer d.Close()
	p, err := d.Detect(context.Background(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !p.Open || p.Filtering != nat.FilteringEI || p.PublicIP != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("loopback profile %v, want open, EI filtering, 127.0.0.1", p)
	}
}

func TestCacheSubscribeAndObservations(t *testing.T) {
	w := newWorld(t, 7)
	r := w.net.AddNAT(natlab.NATConfig{Name: "home", Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP}, PublicIP: netip.MustParseAddr("198.51.100.1")})
	d := w.detector(r.AddHost("peer", netip.MustParseAddr("192.168.1.2")))
	defer d.Close()
	changes, cancel := d.Subscribe()
	defer cancel()
	ctx := context.Background()
	first, err := d.Detect(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if c := <-changes; c.New != first || c.Old != (nat.Profile{}) {
		t.Errorf("first change %+v", c)
	}
	mappings := r.Stats().Mappings
	again, err := d.Detect(ctx, Options{})
	if err != nil || again != first || r.Stats().Mappings != mappings {
		t.Errorf("cached Detect did network I/O or changed: %v, %v (mappings %d → %d)", again, err, mappings, r.Stats().Mappings)
	}
	if lp, err := d.LocalProfile(); err != nil || lp != first {
		t.Errorf("LocalProfile = %v, %v", lp, err)
	}

	// The NAT gets a new public address; peers start reporting it.
	newIP := netip.MustParseAddr("198.51.100.77")
	r.SetPublicIP(newIP)
	d.AddObservation(netip.AddrPortFrom(newIP, 40000))
	if lp, _ := d.LocalProfile(); lp.Confidence != nat.ConfidenceLow {
		t.Errorf("a contradicting observation left confidence %v", lp.Confidence)
	}
	d.AddObservation(netip.AddrPortFrom(newIP, 40001))
	select {
	case c := <-changes:
		if c.Old.PublicIP != first.PublicIP || c.New.PublicIP != newIP {
			t.Errorf("change %v → %v, want public IP %v → %v", c.Old.PublicIP, c.New.PublicIP, first.PublicIP, newIP)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("two contradicting observations did not lead to a re-detection")
	}
}

func BenchmarkLocalProfile(b *testing.B) {
	d := New(Config{})
	defer d.Close()
	d.store(nat.Profile{Mapping: nat.MappingEI})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := d.LocalProfile(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDetect50ms measures a fresh detection with 50 ms one-way delay between the
// NAT and the internet (100 ms round trips), in the emulator on the real clock.
func BenchmarkDetect50ms(b *testing.B) {
	n := natlab.New(natlab.Config{Seed: 1})
	defer n.Close()
	h := n.AddPublicHost("stun", stunIP1, stunIP2)
	s, err := stun.Listen(context.Background(), stun.Config{Listen: stunIP1.String() + ":3478", AltIP: stunIP2, AltPort: 3479, Net: h})
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(context.Background())
	defer s.Close()
	r := n.AddNAT(natlab.NATConfig{Name: "home", Type: nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP},
		PublicIP: netip.MustParseAddr("198.51.100.1"), Uplink: natlab.Link{Latency: 50 * time.Millisecond}})
	peer := r.AddHost("peer", netip.MustParseAddr("192.168.1.2"))
	d := New(Config{Observers: []string{stunIP1.String() + ":3478"}, Net: peer})
	defer d.Close()
	var total time.Duration
	for b.Loop() {
		rep, err := d.DetectReport(context.Background(), Options{Force: true})
		if err != nil {
			b.Fatal(err)
		}
		total += rep.Duration
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/detection")
}

// TestDetectMappingUnderLoss: on a lossy, slow uplink the mapping is still measured —
// the RFC 5780 tests retransmit until they are answered rather than giving up with the
// "no answer" verdicts — for every mapping behaviour and many loss patterns.
func TestDetectMappingUnderLoss(t *testing.T) {
	types := []nat.Type{
		{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP},
		{Mapping: nat.MappingHD, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD},
		{Mapping: nat.MappingPD, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD},
	}
	for _, typ := range types {
		t.Run(typ.String(), func(t *testing.T) {
			t.Parallel()
			for seed := range uint64(15) {
				w := newWorld(t, 100+seed)
				r := w.net.AddNAT(natlab.NATConfig{Name: "home", Type: typ, PublicIP: netip.MustParseAddr("198.51.100.1"),
					Uplink: natlab.Link{Latency: 50 * time.Millisecond, Loss: 0.15}})
				d := w.detector(r.AddHost("peer", netip.MustParseAddr("192.168.1.2")))
				p, err := d.Detect(context.Background(), Options{})
				d.Close()
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				if p.Mapping != typ.Mapping {
					rep, _ := d.LastReport()
					t.Errorf("seed %d: mapping %v, want %v (notes %q)", seed, p.Mapping, typ.Mapping, rep.Notes)
				}
			}
		})
	}
}
