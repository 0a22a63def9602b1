package emuworld

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/detect"
	"peerlink/identity"
	"peerlink/natlab"
	"peerlink/relay"
	"peerlink/signal"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/pion/transport/v4/deadline.(*Deadline).Set.func1"))
}

func start(t *testing.T, cfg Config) *World {
	t.Helper()
	w, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	return w
}

// TestSites profiles each kind of site with STUN against the world's server: what is
// measured is what the site says it was built as.
func TestSites(t *testing.T) {
	w := start(t, Config{Seed: 1})
	tests := []struct {
		nat  string
		want string // the type detected
		open bool
	}{
		{"", "ei-pd-pp", false},
		{"open", "ei-ei-pp", true},
		{"none", "ei-ei-pp", true},
		{"full-cone", "ei-ei-pp", false},
		{"restricted-cone", "ei-hd-pp", false},
		{"port-restricted", "ei-pd-pp", false},
		{"symmetric", "pd-pd-rd", false},
		{"symmetric-seq", "pd-pd-pc", false},
		{"cgnat", "ei-pd-rd", false},
		{"hd-ei-pc", "hd-ei-pc", false},
	}
	for i, tt := range tests {
		t.Run(tt.nat, func(t *testing.T) {
			s, err := w.AddSite("h"+string(rune('a'+i)), SiteConfig{NAT: tt.nat})
			if err != nil {
				t.Fatal(err)
			}
			if (s.NAT == nil) != tt.open || s.Profile.Open != tt.open {
				t.Errorf("NAT %v, profile open %v, want open %v", s.NAT, s.Profile.Open, tt.open)
			}
			if got := s.Profile.Type().String(); got != tt.want {
				t.Errorf("built as %s, want %s", got, tt.want)
			}
			d := detect.New(detect.Config{Observers: w.STUN, Net: s.Host, LocalIPs: func() ([]netip.Addr, error) { return s.Host.Addrs(), nil }})
			defer d.Close()
			p, err := d.Detect(context.Background(), detect.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if p.Type() != s.Profile.Type() || p.Open != s.Profile.Open {
				t.Errorf("detected %v (open %v), built as %v (open %v)", p.Type(), p.Open, s.Profile.Type(), s.Profile.Open)
			}
		})
	}
}

func TestSiteErrors(t *testing.T) {
	w := start(t, Config{})
	for _, tt := range []struct {
		nat  string
		want error
	}{
		{"carrier-pigeon", ErrBadNAT},
		{"udp-blocked", ErrUnsupported},
	} {
		if _, err := w.AddSite("x", SiteConfig{NAT: tt.nat}); !errors.Is(err, tt.want) {
			t.Errorf("%q: %v, want %v", tt.nat, err, tt.want)
		}
	}
	w.Close()
	w.Close()
	if _, err := w.AddSite("y", SiteConfig{}); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: %v, want ErrClosed", err)
	}
}

// TestServers: the relay allocates for a host behind a NAT, on the emulated internet,
// and both the world's own rendezvous server and a given one are used.
func TestServers(t *testing.T) {
	w := start(t, Config{Seed: 2, Signal: signal.Config{RateLimit: 100}})
	s, err := w.AddSite("a", SiteConfig{NAT: "symmetric", Link: natlab.Link{Latency: time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := relay.Dial(ctx, relay.ClientConfig{Server: w.TURN, Username: TURNUser, Password: TURNPassword, Listener: s.Host})
	if err != nil {
		t.Fatal(err)
	}
	if ip := netip.MustParseAddrPort(c.RelayedAddr().String()).Addr(); ip != TURNIP {
		t.Errorf("relayed address %v, want one on %v", c.RelayedAddr(), TURNIP)
	}
	c.Close()

	id, _ := identity.Generate()
	sc, err := signal.Dial(ctx, w.SignalURL, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if _, err := sc.Lookup(ctx, id.NodeID()); err != nil {
		t.Errorf("lookup on the world's rendezvous server: %v", err)
	}
	w2 := start(t, Config{Seed: 3, SignalURL: w.SignalURL})
	if w2.SignalURL != w.SignalURL {
		t.Errorf("SignalURL %q, want the given %q", w2.SignalURL, w.SignalURL)
	}
	if got := w.ServerIPs(); len(got) != 3 || got[2] != TURNIP {
		t.Errorf("ServerIPs %v", got)
	}
}
