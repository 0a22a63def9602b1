package connect

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/nat"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/relay"
	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/stun"
)

// labServices runs, on the lab's two-IP server, what peers need: an RFC 5780 STUN
// server, a rendezvous server and a peerlink relay (the real binary, in the server's
// namespace).
type labServices struct {
	stun   []string
	sigURL string
	relay  *RelayConfig
}

func startLabServices(t *testing.T, l *netlab.Lab) *labServices {
	t.Helper()
	ip1, ip2 := l.Server.IPs[0], l.Server.IPs[1]
	s, err := stun.Listen(context.Background(), stun.Config{Listen: netip.AddrPortFrom(ip1, 3478).String(), AltIP: ip2, AltPort: 3479, Net: l.Server, RateLimit: stun.RateLimit{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(context.Background())
	t.Cleanup(func() { s.Close() })

	srv, err := signal.NewServer(signal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	// Port 443 on the second IP: the UDP-blocking firewall lets only TCP 443 out.
	ln, err := l.Server.Listen(context.Background(), "tcp", netip.AddrPortFrom(ip2, 443).String())
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close(); srv.Close() })

	bin := filepath.Join(t.TempDir(), "peerlink")
	if out, err := exec.Command("go", "build", "-o", bin, "peerlink/cmd/peerlink").CombinedOutput(); err != nil {
		t.Fatalf("building peerlink: %v\n%s", err, out)
	}
	relayAddr := netip.AddrPortFrom(ip1, 3600).String()
	tlsAddr := netip.AddrPortFrom(ip1, 443).String()
	certFile, keyFile, pool := signaltest.Certificate(t)
	cmd := l.Server.Command(context.Background(), bin, "relay", "--listen", relayAddr, "--tls-listen", tlsAddr, "--cert", certFile, "--key", keyFile,
		"--relay-ip", ip1.String(), "--user", "peer:secret", "--metrics", netip.AddrPortFrom(ip1, 9100).String())
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if os.Getenv("PEERLINK_LAB_DEBUG") != "" {
		t.Cleanup(func() { logRelayDrops(t, l) })
	}
	rc := &RelayConfig{Server: relayAddr, TLSServer: tlsAddr, TLSConfig: &tls.Config{RootCAs: pool, ServerName: "localhost"}, Username: "peer", Password: "secret"}
	// Wait until the relay allocates.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := relay.Dial(ctx, relay.ClientConfig{Server: rc.Server, Username: rc.Username, Password: rc.Password, Listener: l.Server})
		cancel()
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("relay in the lab never allocated: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &labServices{stun: []string{netip.AddrPortFrom(ip1, 3478).String()}, sigURL: "ws://" + netip.AddrPortFrom(ip2, 443).String(), relay: rc}
}

func (s *labServices) node(t *testing.T, h *netlab.Host) *Node {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sc, err := signal.Dial(ctx, s.sigURL, id, &signal.Options{DialContext: h.DialContext})
	if err != nil {
		t.Fatalf("%s: signaling: %v", h.Name, err)
	}
	t.Cleanup(func() { sc.Close() })
	n, err := Start(ctx, Config{Identity: id, Signal: sc, STUN: s.stun, Relay: s.relay, Net: h, DialContext: h.DialContext, Logger: labLogger(h.Name),
		LocalIPs: func() ([]netip.Addr, error) { return h.IPs, nil }})
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// TestConnectKernelLab connects every pair of the lab's NAT kinds, each NAT's uplink
// delayed 50 ms each way: every pair connects, the method is the one the strategy
// predicts, and the times to first path and to the direct path are reported.
func TestConnectKernelLab(t *testing.T) { labMatrix(t, 0) }

// TestConnectKernelLabLoss is the same with 5% loss on every uplink as well.
func TestConnectKernelLabLoss(t *testing.T) { labMatrix(t, 5) }

// labLogger logs a lab node's debugging to stderr when $PEERLINK_LAB_DEBUG is set.
func labLogger(name string) *slog.Logger {
	if os.Getenv("PEERLINK_LAB_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("site", name)
}

// labKinds is every NAT kind, or those named in $PEERLINK_LAB_KINDS (comma-separated),
// to look into a few pairs.
func labKinds(t *testing.T) []netlab.Kind {
	env := os.Getenv("PEERLINK_LAB_KINDS")
	if env == "" {
		return netlab.AllKinds()
	}
	var kinds []netlab.Kind
	for _, name := range strings.Split(env, ",") {
		k, err := netlab.ParseKind(name)
		if err != nil {
			t.Fatalf("PEERLINK_LAB_KINDS: %v", err)
		}
		kinds = append(kinds, k)
	}
	return kinds
}

func labMatrix(t *testing.T, loss int) {
	netlabtest.Need(t)
	kinds := labKinds(t)
	link := netlab.Link{Delay: 50 * time.Millisecond, Loss: loss}
	var sites []netlab.SiteConfig
	for _, k := range kinds {
		// Two sites of each kind, so that same-kind pairs cross two NATs.
		sites = append(sites, netlab.SiteConfig{Name: k.String() + "-1", Kind: k, Link: link}, netlab.SiteConfig{Name: k.String() + "-2", Kind: k, Link: link})
	}
	l := netlabtest.Start(t, netlab.Config{Sites: sites})
	svc := startLabServices(t, l)
	nodes := map[string]*Node{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, site := range l.Sites {
		wg.Go(func() {
			n := svc.node(t, site.Host())
			mu.Lock()
			nodes[site.Name] = n
			mu.Unlock()
		})
	}
	wg.Wait()

	type row struct {
		a, b            string
		plan            nat.Plan
		method, want    Method
		first, toDirect time.Duration
		err             error
	}
	var rows []row
	for i, ka := range kinds {
		for _, kb := range kinds[i:] {
			a, b := nodes[ka.String()+"-1"], nodes[kb.String()+"-2"]
			if a == nil || b == nil {
				t.Fatal("a node did not start")
			}
			r := row{a: ka.String(), b: kb.String(), plan: nat.Strategy(a.Profile(), b.Profile())}
			r.want = MethodRelayed
			if r.plan.DirectCapable() {
				r.want = methodOf(r.plan.Primary().Technique)
			}
			c, err := pair(t, a, b, Options{})
			r.err = err
			if err != nil && os.Getenv("PEERLINK_LAB_DEBUG") != "" {
				pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
			}
			if err == nil {
				deadline := time.Now().Add(15 * time.Second)
				for c.Method() != r.want && time.Now().Before(deadline) {
					time.Sleep(20 * time.Millisecond)
				}
				r.method, r.first, r.toDirect = c.Method(), c.Stats().FirstPath, c.Stats().ToDirect
				c.Close()
			}
			rows = append(rows, r)
		}
	}
	// A peer that is offline: ErrPeerOffline in under a second, through the lab.
	gone, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := nodes[kinds[0].String()+"-1"].Connect(context.Background(), gone.NodeID(), Options{}); !errors.Is(err, ErrPeerOffline) {
		t.Errorf("offline peer: %v, want ErrPeerOffline", err)
	} else if d := time.Since(start); d > time.Second {
		t.Errorf("ErrPeerOffline took %v, want under 1s", d)
	}

	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-16s %-16s %-22s %-8s %10s %10s\n", "initiator", "responder", "plan", "method", "first", "direct")
	var simple []time.Duration
	for _, r := range rows {
		if r.err != nil {
			t.Errorf("%s → %s: %v", r.a, r.b, r.err)
			continue
		}
		if r.method != r.want {
			t.Errorf("%s → %s: method %v, strategy predicts %v (plan %v)", r.a, r.b, r.method, r.want, r.plan)
		}
		if t := r.plan.Primary().Technique; t == nat.SimplePunch || t == nat.Direct || t == nat.Reversal {
			simple = append(simple, r.toDirect)
		}
		fmt.Fprintf(&sb, "%-16s %-16s %-22s %-8s %10v %10v\n", r.a, r.b, r.plan, r.method, r.first.Round(time.Millisecond), r.toDirect.Round(time.Millisecond))
	}
	sort.Slice(simple, func(i, j int) bool { return simple[i] < simple[j] })
	if len(simple) > 0 {
		fmt.Fprintf(&sb, "median time to direct for simple punching / direct pairs: %v (%d pairs)\n", simple[len(simple)/2].Round(time.Millisecond), len(simple))
	}
	t.Log(sb.String())
}

// logRelayDrops logs the lab relay's nonzero drop and error counters.
func logRelayDrops(t *testing.T, l *netlab.Lab) {
	hc := &http.Client{Transport: &http.Transport{DialContext: l.Server.DialContext}, Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + netip.AddrPortFrom(l.Server.IPs[0], 9100).String() + "/metrics")
	if err != nil {
		t.Logf("relay metrics: %v", err)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "peerlink_relay") && !strings.HasSuffix(line, " 0") {
			t.Log(line)
		}
	}
}
