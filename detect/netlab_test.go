package detect

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

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
