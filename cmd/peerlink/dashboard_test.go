package main

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBackoffJitter: every reconnection wait is within ±20% of its exponential step,
// the steps double up to the cap and start again after a reset, and agents drawing at
// random do not come back in lockstep: their first waits spread over most of the band.
func TestBackoffJitter(t *testing.T) {
	for _, tt := range []struct {
		name string
		r    float64
		want []time.Duration
	}{
		{"lowest", 0, []time.Duration{800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond, 6400 * time.Millisecond, 12800 * time.Millisecond, 24 * time.Second, 24 * time.Second}},
		{"middle", 0.5, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second, 30 * time.Second}},
		{"highest", math.Nextafter(1, 0), []time.Duration{1200 * time.Millisecond, 2400 * time.Millisecond, 4800 * time.Millisecond, 9600 * time.Millisecond, 19200 * time.Millisecond, 36 * time.Second, 36 * time.Second}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := newBackoff(time.Second, 30*time.Second, reconnectJitter, func() float64 { return tt.r })
			for i, want := range tt.want {
				if got := b.next(); (got - want).Abs() > time.Millisecond {
					t.Errorf("wait %d: %v, want %v", i, got, want)
				}
			}
			b.reset()
			if got := b.next(); (got - tt.want[0]).Abs() > time.Millisecond {
				t.Errorf("after reset: %v, want %v", got, tt.want[0])
			}
		})
	}

	const agents = 200
	rng := rand.New(rand.NewPCG(1, 2))
	var lo, hi time.Duration = time.Hour, 0
	seen := map[time.Duration]bool{}
	for range agents {
		d := newBackoff(time.Second, 30*time.Second, reconnectJitter, rng.Float64).next()
		if d < 800*time.Millisecond || d > 1200*time.Millisecond {
			t.Fatalf("first wait %v outside 0.8-1.2 s", d)
		}
		lo, hi = min(lo, d), max(hi, d)
		seen[d.Truncate(10*time.Millisecond)] = true
	}
	if hi-lo < 300*time.Millisecond || len(seen) < 30 {
		t.Errorf("%d agents' first waits span %v-%v in %d 10 ms slots: still in lockstep", agents, lo, hi, len(seen))
	}
	// The default draws from math/rand/v2.
	b := newBackoff(time.Second, 30*time.Second, reconnectJitter, nil)
	if d := b.next(); d < 800*time.Millisecond || d > 1200*time.Millisecond {
		t.Errorf("default random: first wait %v", d)
	}
}

// TestProber: echoes of the prober's own pings give the round trip and jitter, pings
// unanswered past probeTimeout count as lost, and others' pings are not taken for
// echoes.
func TestProber(t *testing.T) {
	p := newProber()
	t0 := time.Unix(1000, 0)
	if _, ok := p.health(t0); ok {
		t.Fatal("health before any echo")
	}
	rtts := []time.Duration{10 * time.Millisecond, 14 * time.Millisecond, 10 * time.Millisecond, 0, 12 * time.Millisecond} // 0: lost
	now := t0
	for _, rtt := range rtts {
		ping := p.ping(now)
		if rtt > 0 && !p.echo(ping, now.Add(rtt)) {
			t.Fatalf("own ping %q not recognised", ping)
		}
		now = now.Add(time.Second)
	}
	other := newProber().ping(now)
	if p.echo(other, now) {
		t.Errorf("another prober's ping %q taken for an echo", other)
	}
	if p.echo([]byte("peerlink-probe 0011223344556677"), now) {
		t.Error("a 'peerlink connect' probe taken for an echo")
	}
	h, ok := p.health(now.Add(probeTimeout))
	if !ok {
		t.Fatal("no health after echoes")
	}
	// srtt: 10, 10.5, 10.4375, 10.6328…; jitter: 0, 0.25, 0.484, 0.579… ms.
	if h.rtt < 10*time.Millisecond || h.rtt > 11*time.Millisecond {
		t.Errorf("rtt %v, want 10-11 ms", h.rtt)
	}
	if h.jitter < 400*time.Microsecond || h.jitter > 700*time.Microsecond {
		t.Errorf("jitter %v, want about 0.58 ms", h.jitter)
	}
	if h.loss != 0.2 {
		t.Errorf("loss %v, want 0.2 (1 of 5)", h.loss)
	}
	// The loss is over the latest probeWindow pings only.
	for range probeWindow {
		p.echo(p.ping(now), now.Add(time.Millisecond))
		now = now.Add(time.Second)
	}
	if h, _ := p.health(now); h.loss != 0 {
		t.Errorf("loss %v after %d answered pings, want 0", h.loss, probeWindow)
	}
}

func FuzzParseProbe(f *testing.F) {
	prefix := []byte(probeTag + "0011223344556677 ")
	for _, s := range []string{"peerlink-ping 0011223344556677 1", "peerlink-ping 0011223344556677 18446744073709551615", "peerlink-ping 0011223344556677 ", "peerlink-ping 0011223344556677 -1", "peerlink-probe 00", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		seq, ok := parseProbe(b, prefix)
		if !ok {
			return
		}
		digits := strings.TrimLeft(string(b[len(prefix):]), "0")
		if digits == "" {
			digits = "0"
		}
		if got := strconv.FormatUint(seq, 10); got != digits {
			t.Errorf("parsed %q as %s", b, got)
		}
	})
}

func FuzzParseConnectRequest(f *testing.F) {
	for _, s := range []string{`{"node": "x"}`, `{}`, `[]`, `{"node": 1}`, `{"node": "` + string(make([]byte, 10)) + `"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := parseConnectRequest(b)
		if err == nil && id.IsZero() {
			t.Errorf("%q parsed as the zero NodeID", b)
		}
	})
}

func TestHostAllowed(t *testing.T) {
	for _, tt := range []struct {
		host string
		want bool
	}{
		{"127.0.0.1:7474", true},
		{"[::1]:7474", true},
		{"192.0.2.7", true},
		{"localhost:7474", true},
		{"LocalHost.", true},
		{"app.localhost:80", true},
		{"evil.example:7474", false},
		{"localhost.evil.example", false},
		{"", false},
	} {
		if got := hostAllowed(tt.host); got != tt.want {
			t.Errorf("hostAllowed(%q) = %v, want %v", tt.host, got, tt.want)
		}
	}
}

func TestCrossOrigin(t *testing.T) {
	for _, tt := range []struct {
		origin, site string
		refused      bool
	}{
		{"", "", false}, // curl, scripts
		{"http://127.0.0.1:7474", "same-origin", false},
		{"http://127.0.0.1:7474", "", false},
		{"", "none", false}, // typed into the address bar
		{"http://127.0.0.1:7475", "", true},
		{"http://evil.example", "cross-site", true},
		{"", "same-site", true},
		{"null", "", true},
		{"file://", "", true},
	} {
		r, _ := http.NewRequest(http.MethodPost, "http://127.0.0.1:7474/api/connect", nil)
		if tt.origin != "" {
			r.Header.Set("Origin", tt.origin)
		}
		if tt.site != "" {
			r.Header.Set("Sec-Fetch-Site", tt.site)
		}
		if got := crossOrigin(r); (got != "") != tt.refused {
			t.Errorf("Origin %q, Sec-Fetch-Site %q: %q, want refused %v", tt.origin, tt.site, got, tt.refused)
		}
	}
}

func TestHTTPListenAddr(t *testing.T) {
	for in, want := range map[string]string{
		"7474":           "127.0.0.1:7474",
		":7474":          "127.0.0.1:7474",
		"127.0.0.1:0":    "127.0.0.1:0",
		"0.0.0.0:7474":   "0.0.0.0:7474",
		"[::1]:7474":     "[::1]:7474",
		"localhost:7474": "localhost:7474",
	} {
		if got := httpListenAddr(in); got != want {
			t.Errorf("httpListenAddr(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestServeDashboardAPI: serve's metrics listener has the dashboard's status, which
// lists an agent as a connected peer, its relay allocation as a session and the relay
// as registered; the STUN requests of the agent's profiling are counted.
func TestServeDashboardAPI(t *testing.T) {
	srv := startServe(t, []string{"PEERLINK_TURN_SECRET=s3cret"}, loopbackServe("--metrics", "127.0.0.1:0")...)
	a := startAgent(t, "--server", srv.lines["rendezvous"], "--stun", srv.stunAddr(t))
	base := srv.lines["dashboard"]
	if !strings.HasPrefix(base, "http://127.0.0.1:") {
		t.Fatalf("dashboard line: %q", base)
	}
	var st serveStatus
	deadline := time.Now().Add(5 * time.Second)
	for {
		if err := json.Unmarshal([]byte(httpGet(t, base+"api/status")), &st); err != nil {
			t.Fatal(err)
		}
		if st.Rendezvous != nil && len(st.Rendezvous.Peers) == 1 && st.Relay != nil && len(st.Relay.List) == 1 && len(st.Relays) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never showed the agent, its relay session and the relay: %+v", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if p := st.Rendezvous.Peers[0]; p.Node != a.node || !strings.HasPrefix(p.Remote, "127.0.0.1:") {
		t.Errorf("connected peer: %+v, want %s", p, a.node)
	}
	if s := st.Relay.List[0]; !strings.HasSuffix(s.User, a.node) || s.Transport != "udp" || st.Relay.Sessions != 1 {
		t.Errorf("relay session: %+v", s)
	}
	if r := st.Relays[0]; len(r.Endpoints) == 0 || r.Load != 1 && r.Load != 0 {
		t.Errorf("registered relay: %+v", r)
	}
	if st.STUN == nil || st.STUN.Requests == 0 {
		t.Errorf("STUN: %+v, want the agent's requests counted", st.STUN)
	}
	// Scrapers may name the host; the dashboard answers only to addresses.
	for path, code := range map[string]int{"metrics": 200, "healthz": 200, "": http.StatusMisdirectedRequest, "api/status": http.StatusMisdirectedRequest} {
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		req.Host = "metrics.example:9090"
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != code {
			t.Errorf("GET /%s as metrics.example: %s, want %d", path, resp.Status, code)
		}
	}
}
