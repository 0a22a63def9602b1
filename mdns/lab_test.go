package mdns

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
)

// inHost starts an advertiser and a browser inside h's namespace.
func inHost(t *testing.T, h *netlab.Host, cfg Config, svc Service) (*Advertiser, *Browser) {
	t.Helper()
	var a *Advertiser
	var b *Browser
	err := h.Do(func() error {
		var err error
		if svc.Port != 0 {
			if a, err = Advertise(context.Background(), cfg, svc); err != nil {
				return err
			}
		}
		b, err = Browse(context.Background(), cfg)
		return err
	})
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	t.Cleanup(func() {
		if a != nil {
			a.Close()
		}
		b.Close()
	})
	return a, b
}

// waitEvent returns the first event of kind about id, skipping others.
func waitEvent(t *testing.T, b *Browser, kind EventKind, id identity.NodeID, within time.Duration) (Event, time.Duration) {
	t.Helper()
	start := time.Now()
	deadline := time.After(within)
	for {
		select {
		case ev, ok := <-b.Events():
			if !ok {
				t.Fatal("events closed")
			}
			if ev.Kind == kind && ev.Peer.NodeID == id {
				return ev, time.Since(start)
			}
		case <-deadline:
			t.Fatalf("no %v event for %s within %v", kind, id.Short(), within)
		}
	}
}

func TestLANDiscovery(t *testing.T) {
	netlabtest.Need(t)
	tests := []struct {
		name string
		ipv6 bool
		cfg  Config
	}{
		{"ipv4", false, Config{}},
		{"dual stack", true, Config{}},
		{"ipv6 only", true, Config{DisableIPv4: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lan := netlabtest.StartLAN(t, netlab.LANConfig{Hosts: 2, IPv6: tc.ipv6})
			ids := []identity.NodeID{testID(10), testID(11)}
			ports := []uint16{4000, 4001}
			var advs []*Advertiser
			var brs []*Browser
			for i, h := range lan.Hosts {
				a, b := inHost(t, h, tc.cfg, Service{NodeID: ids[i], Port: ports[i], Profile: "none"})
				advs, brs = append(advs, a), append(brs, b)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			for i, b := range brs {
				j := 1 - i
				start := time.Now()
				p, err := b.Lookup(ctx, ids[j])
				if err != nil {
					t.Fatalf("host %d looking for host %d: %v", i, j, err)
				}
				t.Logf("host %d found host %d in %v: %v port %d", i, j, time.Since(start).Round(time.Millisecond), p.Addrs, p.Port)
				if p.Port != ports[j] || p.Profile != "none" || p.Interface != "eth0" || p.TXT[KeyVersion] != TXTVersion {
					t.Errorf("peer %+v", p)
				}
				if slices.Contains(p.Addrs, netlab.LANAddr(j)) == tc.cfg.DisableIPv4 {
					t.Errorf("peer addresses %v: %v present %v, want %v", p.Addrs, netlab.LANAddr(j), !tc.cfg.DisableIPv4, !tc.cfg.DisableIPv4)
				}
				v6 := slices.ContainsFunc(p.Addrs, func(a netip.Addr) bool { return a.Is6() && a.IsLinkLocalUnicast() && a.Zone() == "eth0" })
				if v6 != tc.ipv6 {
					t.Errorf("peer addresses %v: link-local IPv6 present %v, want %v", p.Addrs, v6, tc.ipv6)
				}
				// Each browser also sees its own host's advertiser (multicast loopback).
				if _, err := b.Lookup(ctx, ids[i]); err != nil {
					t.Errorf("host %d does not see itself: %v", i, err)
				}
			}

			// Goodbye: closing host 1's advertiser removes it from host 0's view.
			advs[1].Close()
			advs[1].Close() // idempotent
			_, took := waitEvent(t, brs[0], Lost, ids[1], 5*time.Second)
			t.Logf("goodbye seen after %v", took.Round(time.Millisecond))
			if slices.ContainsFunc(brs[0].Peers(), func(p Peer) bool { return p.NodeID == ids[1] }) {
				t.Error("peer still listed after goodbye")
			}
		})
	}
}

func TestLANExpiry(t *testing.T) {
	lan := netlabtest.StartLAN(t, netlab.LANConfig{Hosts: 2})
	id := testID(12)
	_, b := inHost(t, lan.Hosts[0], Config{}, Service{})
	a, _ := inHost(t, lan.Hosts[1], Config{}, Service{NodeID: id, Port: 4100, TTL: 3 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.Lookup(ctx, id); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, b, Found, id, time.Second)
	// The advertiser's host drops off the link without a goodbye getting through.
	if _, err := lan.Hosts[1].Run(ctx, "ip", "link", "set", "eth0", "down"); err != nil {
		t.Fatal(err)
	}
	ev, took := waitEvent(t, b, Lost, id, 8*time.Second)
	t.Logf("expired after %v", took.Round(time.Millisecond))
	// The last record heard may be up to a re-announcement (TTL/2) old.
	if took < 1400*time.Millisecond {
		t.Errorf("lost after %v, before the records' TTL could run out", took)
	}
	if ev.Peer.Port != 4100 {
		t.Errorf("lost peer %+v", ev.Peer)
	}
	a.Close()
}
