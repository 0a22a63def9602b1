package detect

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"peerlink/internal/coturn"
	"peerlink/nat"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/stun"
)

// labObservers starts an RFC 5780 STUN server on the lab's two-IP server host, plus a
// single-IP observer on its second address, and returns the observer list. A benchmark
// that detects back to back from one address would otherwise meet the servers' abuse
// limits, so they can be turned off.
func labObservers(t testing.TB, l *netlab.Lab, limits ...stun.RateLimit) []string {
	t.Helper()
	ip1, ip2 := l.Server.IPs[0], l.Server.IPs[1]
	for _, cfg := range []stun.Config{
		{Listen: netip.AddrPortFrom(ip1, 3478).String(), AltIP: ip2, AltPort: 3479},
		{Listen: netip.AddrPortFrom(ip2, 3480).String()},
	} {
		cfg.Net = l.Server
		if len(limits) > 0 {
			cfg.RateLimit = limits[0]
		}
		s, err := stun.Listen(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- s.Serve(context.Background()) }()
		t.Cleanup(func() { s.Close(); <-done })
	}
	return []string{netip.AddrPortFrom(ip1, 3478).String(), netip.AddrPortFrom(ip2, 3480).String()}
}

func labDetector(h *netlab.Host, observers []string) *Detector {
	return New(Config{Observers: observers, Net: h, LocalIPs: func() ([]netip.Addr, error) { return h.IPs, nil }})
}

// TestDetectKernelLab: in real kernel NATs, the detector classifies every kind of the
// lab as the lab claims (the lab's own prober has verified the claims).
func TestDetectKernelLab(t *testing.T) {
	l := netlabtest.Start(t, netlab.Config{})
	observers := labObservers(t, l)
	for _, site := range l.Sites {
		t.Run(site.Name, func(t *testing.T) {
			d := labDetector(site.Host(), observers)
			defer d.Close()
			claim := site.Claim()
			p, err := d.Detect(context.Background(), Options{Timeout: 2 * time.Second})
			if claim.UDPBlocked {
				if !errors.Is(err, ErrDetectionTimeout) || !p.UDPBlocked {
					t.Fatalf("UDP-blocked site: Detect = %v, %v; want UDPBlocked and ErrDetectionTimeout", p, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			rep, _ := d.LastReport()
			if p.Type() != claim.Type() || p.Open != claim.Open || p.PortDelta != claim.PortDelta {
				t.Fatalf("detected %s, lab claims %s (notes %q)", netlab.ClaimString(p), netlab.ClaimString(claim), rep.Notes)
			}
			t.Logf("%s: %s in %v, confidence %v", site.Name, netlab.ClaimString(p), rep.Duration.Round(time.Millisecond), p.Confidence)
		})
	}
}

// BenchmarkDetectKernelLab50ms measures a fresh detection behind a kernel
// port-restricted cone NAT whose uplink delays every packet 50 ms each way.
func BenchmarkDetectKernelLab50ms(b *testing.B) {
	l := netlabtest.Start(b, netlab.Config{Sites: []netlab.SiteConfig{{Kind: netlab.KindPortRestricted, Link: netlab.Link{Delay: 50 * time.Millisecond}}}})
	d := labDetector(l.Sites[0].Host(), labObservers(b, l, stun.RateLimit{Disabled: true}))
	defer d.Close()
	// The first detection in a new lab also pays for ARP across the delayed links (a
	// round trip of 200 ms rather than 100): a warm-up keeps it out of the figure, which
	// is for a host whose neighbours are known.
	if _, err := d.DetectReport(context.Background(), Options{Force: true}); err != nil {
		b.Fatal(err)
	}
	var total time.Duration
	for b.Loop() {
		rep, err := d.DetectReport(context.Background(), Options{Force: true})
		if err != nil {
			b.Fatal(err)
		}
		if got, want := rep.Profile.Type(), l.Sites[0].Claim().Type(); got != want {
			b.Fatalf("detected %s, want %s", got, want)
		}
		total += rep.Duration
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/detection")
}

// TestDetectAgainstCoturn: in the kernel lab, the detector draws the same profile from
// coturn's RFC 5780 server as from peerlink's, for every NAT kind.
func TestDetectAgainstCoturn(t *testing.T) {
	l := netlabtest.Start(t, netlab.Config{})
	ours := labObservers(t, l)
	ip1, ip2 := l.Server.IPs[0], l.Server.IPs[1]
	srv, err := coturn.Start(context.Background(), coturn.Options{
		IPs: []netip.Addr{ip1, ip2}, Port: 3500, AltPort: 3501, Dir: t.TempDir(),
		Command: l.Server.Command, Net: l.Server,
	})
	if err != nil { // as root, make test has installed coturn: missing is a broken setup
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	theirs := []string{netip.AddrPortFrom(ip1, 3500).String()}
	for _, site := range l.Sites {
		if site.Kind == netlab.KindUDPBlocked {
			continue
		}
		t.Run(site.Name, func(t *testing.T) {
			profile := func(observers []string) nat.Profile {
				d := labDetector(site.Host(), observers)
				defer d.Close()
				p, err := d.Detect(context.Background(), Options{})
				if err != nil {
					t.Fatalf("against %v: %v", observers, err)
				}
				return p
			}
			a, b := profile(ours[:1]), profile(theirs)
			if a.Type() != b.Type() || a.Open != b.Open || a.PortDelta != b.PortDelta || a.PublicIP != b.PublicIP {
				t.Errorf("peerlink's server: %s at %v; coturn: %s at %v", netlab.ClaimString(a), a.PublicIP, netlab.ClaimString(b), b.PublicIP)
			}
			if a.Type() != site.Claim().Type() {
				t.Errorf("detected %s, lab claims %s", netlab.ClaimString(a), netlab.ClaimString(site.Claim()))
			}
		})
	}
}
