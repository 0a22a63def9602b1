package benchrun

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"peerlink/detect"
	"peerlink/netlab"
	"peerlink/stun"
)

// ErrWrongProfile means a detection in the lab disagreed with what the lab's NAT is.
var ErrWrongProfile = errors.New("benchrun: detected profile differs from the lab's NAT")

// DetectLabResult is DetectLab's measurement.
type DetectLabResult struct {
	// First is the first detection in the new lab. It is slower than the rest for a
	// reason that is the lab's, not the detector's: the delay applies to ARP too, so the
	// first packets wait for neighbour resolution across the delayed link.
	First time.Duration
	// Fresh are the detections after it, each forced (no cached profile).
	Fresh []time.Duration
	// RTT is the round trip to the primary observer measured by the last detection.
	RTT time.Duration
}

// DetectLab builds a kernel lab with one port-restricted cone NAT whose uplink delays
// every packet by delay each way, runs peerlink's RFC 5780 STUN server and a second
// observer on the lab's server, and times n+1 forced detections, each checked against
// the lab's NAT. It needs root.
func DetectLab(ctx context.Context, delay time.Duration, n int) (DetectLabResult, error) {
	var res DetectLabResult
	if err := netlab.CheckRoot(); err != nil {
		return res, err
	}
	l, err := netlab.New(ctx, netlab.Config{Sites: []netlab.SiteConfig{{Kind: netlab.KindPortRestricted, Link: netlab.Link{Delay: delay}}}})
	if err != nil {
		return res, err
	}
	defer l.Close()
	ip1, ip2 := l.Server.IPs[0], l.Server.IPs[1]
	observers := []string{netip.AddrPortFrom(ip1, 3478).String(), netip.AddrPortFrom(ip2, 3480).String()}
	for _, cfg := range []stun.Config{
		{Listen: observers[0], AltIP: ip2, AltPort: 3479},
		{Listen: observers[1]},
	} {
		// Back-to-back detections from one address would meet the abuse limits.
		cfg.Net, cfg.RateLimit = l.Server, stun.RateLimit{Disabled: true}
		s, err := stun.Listen(ctx, cfg)
		if err != nil {
			return res, err
		}
		done := make(chan struct{})
		go func() { defer close(done); s.Serve(context.Background()) }()
		defer func() { s.Close(); <-done }()
	}
	h, want := l.Sites[0].Host(), l.Sites[0].Claim()
	d := detect.New(detect.Config{Observers: observers, Net: h, LocalIPs: func() ([]netip.Addr, error) { return h.IPs, nil }})
	defer d.Close()
	for i := range n + 1 {
		rep, err := d.DetectReport(ctx, detect.Options{Force: true})
		if err != nil {
			return res, err
		}
		if got := rep.Profile.Type(); got != want.Type() {
			return res, fmt.Errorf("%w: detected %s, lab has %s", ErrWrongProfile, got, want.Type())
		}
		if len(rep.Servers) > 0 {
			res.RTT = rep.Servers[0].RTT
		}
		if i == 0 {
			res.First = rep.Duration
		} else {
			res.Fresh = append(res.Fresh, rep.Duration)
		}
	}
	return res, nil
}
