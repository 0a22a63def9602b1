package session

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/portmap"
	"peerlink/portmap/portmaptest"
	"peerlink/relay"
	"peerlink/signal"
	"peerlink/stun"
)

// labSize is how much each kernel-lab transfer moves: 1 GiB with PEERLINK_LONG=1.
// Under the race detector QUIC is several times slower, so 32 MiB keeps the package
// within its time budget.
func labSize() int64 {
	switch {
	case os.Getenv("PEERLINK_LONG") == "1":
		return 1 << 30
	case raceEnabled:
		return 32 << 20
	}
	return 128 << 20
}

// labWorld is a kernel lab with what peers need on its server: STUN, rendezvous, and
// peerlink's relay (the real binary, in the server's namespace).
type labWorld struct {
	l      *netlab.Lab
	stun   []string
	sigURL string
	relay  *connect.RelayConfig
}

func startLab(t testing.TB, sites []netlab.SiteConfig) *labWorld {
	t.Helper()
	l := netlabtest.Start(t, netlab.Config{Sites: sites})
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
	cmd := l.Server.Command(context.Background(), bin, "relay", "--listen", relayAddr, "--relay-ip", ip1.String(), "--user", "peer:secret")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	rc := &connect.RelayConfig{Server: relayAddr, Username: "peer", Password: "secret"}
	for deadline := time.Now().Add(10 * time.Second); ; {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := relay.Dial(ctx, relay.ClientConfig{Server: rc.Server, Username: rc.Username, Password: rc.Password, Listener: l.Server})
		cancel()
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the lab's relay never allocated: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &labWorld{l: l, stun: []string{netip.AddrPortFrom(ip1, 3478).String()}, sigURL: "ws://" + netip.AddrPortFrom(ip2, 443).String(), relay: rc}
}

func (w *labWorld) node(t testing.TB, h *netlab.Host) *node {
	t.Helper()
	return w.nodeWith(t, h, nil)
}

// nodeWith is node with changes to the node's Config.
func (w *labWorld) nodeWith(t testing.TB, h *netlab.Host, change func(*connect.Config)) *node {
	t.Helper()
	return w.nodeVia(t, h, nil, change)
}

// nodeVia is nodeWith whose rendezvous client goes through proxy (nil: directly).
func (w *labWorld) nodeVia(t testing.TB, h *netlab.Host, proxy *url.URL, change func(*connect.Config)) *node {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	so := &signal.Options{DialContext: h.DialContext, Proxy: signal.DirectOnly}
	if proxy != nil {
		so.Proxy = http.ProxyURL(proxy)
	}
	sc, err := signal.Dial(ctx, w.sigURL, id, so)
	if err != nil {
		t.Fatalf("%s: signaling: %v", h.Name, err)
	}
	t.Cleanup(func() { sc.Close() })
	cfg := connect.Config{Identity: id, Signal: sc, STUN: w.stun, Relay: w.relay, Net: h, DialContext: h.DialContext,
		LocalIPs: func() ([]netip.Addr, error) { return h.IPs, nil }}
	if change != nil {
		change(&cfg)
	}
	n, err := connect.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	t.Cleanup(func() { n.Close() })
	if cfg.Relay != nil {
		if err := n.WaitRelay(ctx); err != nil {
			t.Fatalf("%s: relay: %v", h.Name, err)
		}
	}
	return &node{Node: n, id: id}
}

// TestKernelLab runs sessions through real kernel NATs: a punched transfer between two
// port-restricted NATs, a relayed one between two symmetric NATs, and a punched one
// whose direct path is cut half way.
func TestKernelLab(t *testing.T) {
	netlabtest.Need(t)
	w := startLab(t, []netlab.SiteConfig{
		{Name: "pr-1", Kind: netlab.KindPortRestricted}, {Name: "pr-2", Kind: netlab.KindPortRestricted},
		{Name: "sym-1", Kind: netlab.KindSymmetric}, {Name: "sym-2", Kind: netlab.KindSymmetric},
	})
	nodes := map[string]*node{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, s := range w.l.Sites {
		wg.Go(func() {
			// Direct paths that fell back to the relay retry every 5 s rather than
			// the default 60 s, so the move back is seen within the test.
			n := w.nodeWith(t, s.Host(), func(c *connect.Config) { c.PathCheck.Retry = 5 * time.Second })
			mu.Lock()
			nodes[s.Name] = n
			mu.Unlock()
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	size := labSize()

	for _, tt := range []struct {
		name, a, b string
		method     connect.Method
	}{
		{"port-restricted pair punched", "pr-1", "pr-2", connect.MethodPunched},
		{"symmetric pair relayed", "sym-1", "sym-2", connect.MethodRelayed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a, b := nodes[tt.a], nodes[tt.b]
			ca, cb := connPair(t, a, b, tt.method)
			sa, sb := sessionPair(t, ca, cb, a.id, b.id)
			mbps := transfer(t, sa, sb, size, 1)
			if sa.Method() != tt.method {
				t.Errorf("method %v after the transfer, want %v", sa.Method(), tt.method)
			}
			t.Logf("%s: %d MiB, sha256 equal, %.0f Mbit/s (race detector %v); %+v", tt.name, size>>20, mbps, raceEnabled, sa.Stats())
			logUDPErrors(t, w.l.Site(tt.a).Host(), w.l.Site(tt.b).Host())
			sa.Close()
			sb.Close()
		})
	}

	t.Run("direct path cut and healed mid-transfer", func(t *testing.T) {
		a, b := nodes["pr-1"], nodes["pr-2"]
		ca, cb := connPair(t, a, b, connect.MethodPunched)
		sa, sb := sessionPair(t, ca, cb, a.id, b.id)
		site := w.l.Site("pr-1")
		peerIP := w.l.Site("pr-2").PublicIP
		both := func(m connect.Method, within time.Duration) time.Duration {
			start := time.Now()
			for (ca.Method() != m || cb.Method() != m) && time.Since(start) < within {
				time.Sleep(10 * time.Millisecond)
			}
			return time.Since(start)
		}
		type moves struct{ away, back time.Duration }
		moved := make(chan moves, 1)
		go func() {
			var mv moves
			defer func() { moved <- mv }()
			time.Sleep(time.Second)
			if err := site.Cut(context.Background(), peerIP); err != nil {
				t.Errorf("cut: %v", err)
				return
			}
			mv.away = both(connect.MethodRelayed, 15*time.Second)
			if err := site.Cut(context.Background()); err != nil {
				t.Errorf("heal: %v", err)
				return
			}
			mv.back = both(connect.MethodPunched, 20*time.Second)
		}()
		defer site.Cut(context.Background())
		// Paced so that it lasts past the cut, the move, the heal and the move back
		// whatever the machine's speed.
		mbps := pacedTransfer(t, sa, sb, 48<<20, 2, 250*time.Millisecond)
		mv := <-moved
		if mv.away > 5*time.Second {
			t.Errorf("moving to the relay took %v, want within 5 s", mv.away)
		}
		if ca.Method() != connect.MethodPunched || cb.Method() != connect.MethodPunched {
			t.Fatalf("after the heal: %v / %v, want punched on both again", ca.Method(), cb.Method())
		}
		if mv.back > 10*time.Second {
			t.Errorf("moving back took %v, want within the 5 s retry and the pongs it needs", mv.back)
		}
		st := ca.Stats()
		if st.Fallbacks != 1 || st.Restores != 1 {
			t.Errorf("fallbacks %d, restores %d: want one each (no flapping)", st.Fallbacks, st.Restores)
		}
		t.Logf("cut the direct path 1 s in: both sides relayed %v later; healed then: both punched again %v later; 48 MiB intact at %.0f Mbit/s; %+v",
			mv.away.Round(time.Millisecond), mv.back.Round(time.Millisecond), mbps, sa.Stats())
		sa.Close()
		sb.Close()
	})
	// A NAT that forgets its mappings mid-transfer (a router reboot, a conntrack
	// flush): the symmetric NAT moves every flow to new random ports, so the relay no
	// longer knows the node's allocation and the node must allocate again and tell its
	// peer; the port-preserving NAT hands the same ports out again.
	for _, tt := range []struct {
		name, a, b string
		method     connect.Method
	}{
		{"symmetric NAT flushed mid-transfer, relayed", "sym-1", "sym-2", connect.MethodRelayed},
		{"port-restricted NAT flushed mid-transfer, punched", "pr-1", "pr-2", connect.MethodPunched},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a, b := nodes[tt.a], nodes[tt.b]
			ca, cb := connPair(t, a, b, tt.method)
			sa, sb := sessionPair(t, ca, cb, a.id, b.id)
			// The longest stretch in which nothing arrived, watched from the receiver.
			stop := make(chan struct{})
			stalled := make(chan time.Duration, 1)
			flushedAt := make(chan time.Time, 1)
			go func() {
				time.Sleep(time.Second)
				if err := w.l.Site(tt.a).Flush(context.Background()); err != nil {
					t.Errorf("flush: %v", err)
				}
				flushedAt <- time.Now()
			}()
			go func() {
				var longest time.Duration
				last, lastN := time.Now(), cb.Stats().Received
				for {
					select {
					case <-stop:
						stalled <- longest
						return
					case <-time.After(10 * time.Millisecond):
					}
					if n := cb.Stats().Received; n != lastN {
						longest = max(longest, time.Since(last))
						last, lastN = time.Now(), n
					}
				}
			}()
			mbps := pacedTransfer(t, sa, sb, 24<<20, 3, 250*time.Millisecond)
			close(stop)
			gap := <-stalled
			<-flushedAt
			if gap > 15*time.Second {
				t.Errorf("the transfer stalled for %v after the flush, want well under 15 s", gap)
			}
			t.Logf("%s NAT flushed 1 s in: 24 MiB intact at %.0f Mbit/s; longest stall %v; method %v/%v; %+v",
				tt.a, mbps, gap.Round(time.Millisecond), ca.Method(), cb.Method(), sa.Stats())
			sa.Close()
			sb.Close()
		})
	}
}

// TestKernelLabPortMapping: a node behind a symmetric NAT whose router runs
// miniupnpd asks it for a port mapping and publishes the mapped address; a peer behind
// another symmetric NAT, which without the mapping could only be relayed to it,
// connects directly and a transfer arrives intact. Closing the node deletes the
// mapping on the router.
func TestKernelLabPortMapping(t *testing.T) {
	netlabtest.Need(t)
	w := startLab(t, []netlab.SiteConfig{{Name: "sym-upnp", Kind: netlab.KindSymmetric}, {Name: "sym-2", Kind: netlab.KindSymmetric}})
	router := portmaptest.Start(t, w.l, w.l.Site("sym-upnp"), netip.MustParseAddrPort(w.stun[0]))
	a := w.nodeWith(t, router.Host, func(c *connect.Config) {
		c.PortMap = &portmap.Config{Gateway: router.Gateway, Net: router.Host, Dialer: router.Host, Lifetime: 10 * time.Minute, Timeout: 2 * time.Second}
	})
	b := w.node(t, w.l.Site("sym-2").Host())
	deadline := time.Now().Add(15 * time.Second)
	for a.PortMapping() == nil || !a.Profile().PortMapped {
		if time.Now().After(deadline) {
			t.Fatalf("no port mapping within 15 s; miniupnpd log:\n%s", router.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	m := a.PortMapping()
	ext := m.External()
	if ext.Addr() != w.l.Site("sym-upnp").PublicIP {
		t.Fatalf("mapped address %v, want on the router's public IP %v", ext, w.l.Site("sym-upnp").PublicIP)
	}
	if a.Profile().Public() != ext {
		t.Errorf("profile's public address %v, want the mapping %v", a.Profile().Public(), ext)
	}
	// The peer looks the node up and connects: the mapped address makes it reachable.
	var ca, cb *connect.Conn
	for range 3 { // the first lookups may race the publication of the mapping
		ca, cb = connPairAny(t, b, a)
		if ca.Method() == connect.MethodDirect {
			break
		}
		ca.Close()
		cb.Close()
		time.Sleep(500 * time.Millisecond)
	}
	if ca.Method() != connect.MethodDirect || cb.Method() != connect.MethodDirect {
		t.Fatalf("connected %v / %v, want direct to the mapped address (%s)", ca.Method(), cb.Method(), m.Protocol())
	}
	sa, sb := sessionPair(t, ca, cb, b.id, a.id)
	mbps := transfer(t, sa, sb, 16<<20, 4)
	t.Logf("sym-2 → sym-upnp through a %s mapping %v: direct, 16 MiB intact at %.0f Mbit/s", m.Protocol(), ext, mbps)
	sa.Close()
	sb.Close()
	a.Close()
	if rules := router.Rules(t); strings.Contains(rules, fmt.Sprintf("%s:%d", router.Host.IP(), m.InternalPort())) {
		t.Errorf("the mapping outlived the node:\n%s", rules)
	}
}

// connPairAny connects a to b and returns both ends, whatever the method.
func connPairAny(t testing.TB, a, b *node) (*connect.Conn, *connect.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	accepted := make(chan *connect.Conn, 1)
	go func() {
		c, _ := b.Accept(ctx)
		accepted <- c
	}()
	ca, err := a.Connect(ctx, b.NodeID(), connect.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cb := <-accepted
	if cb == nil {
		t.Fatal("not accepted")
	}
	// A direct path may come a moment after the first (relayed) one.
	for wait := time.Now().Add(3 * time.Second); ca.Method() != connect.MethodDirect && time.Now().Before(wait); {
		time.Sleep(20 * time.Millisecond)
	}
	return ca, cb
}

// TestKernelLabHTTPSRelay: a host whose only way out is an HTTP CONNECT proxy on its
// router (tinyproxy on port 3128; the router forwards nothing from the LAN: no UDP, no
// TCP) connects to a peer behind a symmetric NAT. Its rendezvous connection goes
// through the proxy, and so does the connection: the rendezvous server relays it. A
// stream transfer arrives intact end to end, and the method says so.
func TestKernelLabHTTPSRelay(t *testing.T) {
	netlabtest.Need(t)
	bin, err := exec.LookPath("tinyproxy")
	if err != nil {
		t.Fatalf("running as root but tinyproxy is missing (apt-get install -y tinyproxy): %v", err)
	}
	w := startLab(t, []netlab.SiteConfig{{Name: "proxied", Kind: netlab.KindUDPBlocked}, {Name: "sym", Kind: netlab.KindSymmetric}})
	site := w.l.Site("proxied")
	router, host := site.Routers[0], site.Host()
	gw := host.IP().As4()
	gw[3] = 1
	proxyIP := netip.AddrFrom4(gw)
	ctx := context.Background()
	if out, err := router.Run(ctx, "nft", "insert", "rule", "ip", "peerlink", "forward", "iifname", "lan0", "drop"); err != nil {
		t.Fatalf("closing the router to the LAN: %v %s", err, out)
	}
	conf := filepath.Join(t.TempDir(), "tinyproxy.conf")
	body := fmt.Sprintf("Port 3128\nListen %s\nTimeout 600\nMaxClients 50\nAllow %s/24\nConnectPort 443\nLogLevel Warning\n", proxyIP, proxyIP)
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	proxy := router.Command(ctx, bin, "-d", "-c", conf)
	proxy.Stdout, proxy.Stderr = os.Stderr, os.Stderr
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Process.Kill(); proxy.Wait() })
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		c, err := host.DialContext(ctx, "tcp", netip.AddrPortFrom(proxyIP, 3128).String())
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tinyproxy never listened: %v", err)
		}
	}
	// Without the proxy the rendezvous server is out of reach.
	dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
	if c, err := host.DialContext(dctx, "tcp", strings.TrimPrefix(w.sigURL, "ws://")); err == nil {
		c.Close()
		t.Fatal("the proxied host reached the rendezvous server directly")
	}
	dcancel()

	a := w.nodeVia(t, host, &url.URL{Scheme: "http", Host: netip.AddrPortFrom(proxyIP, 3128).String()}, func(c *connect.Config) { c.Relay = nil })
	if !a.Profile().UDPBlocked {
		t.Errorf("the proxied host's profile %v: want UDP blocked", a.Profile())
	}
	b := w.node(t, w.l.Site("sym").Host())
	ca, cb := connPairAny(t, b, a)
	took := ca.Stats().FirstPath
	if ca.Method() != connect.MethodRelayedHTTPS || cb.Method() != connect.MethodRelayedHTTPS {
		t.Fatalf("connected %v / %v, want %v on both", ca.Method(), cb.Method(), connect.MethodRelayedHTTPS)
	}
	sa, sb := sessionPair(t, ca, cb, b.id, a.id)
	mbps := transfer(t, sa, sb, 4<<20, 5)
	t.Logf("sym → proxied (only an HTTP CONNECT proxy out): %v after %v; 4 MiB intact at %.1f Mbit/s through the rendezvous server", ca.Method(), took.Round(time.Millisecond), mbps)
	sa.Close()
	sb.Close()
}

// BenchmarkKernelLabVsIperf3 measures a session stream from a host behind a
// port-restricted NAT to a public host against iperf3 over the same kernel-lab path:
// TCP, UDP at full speed with QUIC-sized datagrams, and QUIC straight on the hosts'
// sockets. The figures are reported as metrics (Mbit/s, and the session's share of
// iperf3 TCP in percent).
func BenchmarkKernelLabVsIperf3(b *testing.B) {
	netlabtest.Need(b)
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed (apt-get install -y iperf3)")
	}
	w := startLab(b, []netlab.SiteConfig{{Name: "pr-1", Kind: netlab.KindPortRestricted}, {Name: "pub", Kind: netlab.KindNone}})
	var pr, pub *node
	var wg sync.WaitGroup
	wg.Go(func() { pr = w.node(b, w.l.Site("pr-1").Host()) })
	wg.Go(func() { pub = w.node(b, w.l.Site("pub").Host()) })
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	size := labSize()
	client, server := w.l.Site("pr-1").Host(), w.l.Site("pub").Host()
	var mbps, tcp, udp, raw float64
	for b.Loop() {
		ca, cb := connPair(b, pr, pub, connect.MethodDirect)
		sa, sb := sessionPair(b, ca, cb, pr.id, pub.id)
		mbps = transfer(b, sa, sb, size, 5)
		b.Logf("sender %+v\nreceiver %+v\nreceiver's connection %+v", sa.Stats(), sb.Stats(), cb.Stats())
		sa.Close()
		sb.Close()
		tcp = iperf3(b, client, server, false)
		udp = iperf3(b, client, server, true)
		raw = rawQUIC(b, client, server, size)
	}
	b.ReportMetric(mbps, "session-Mbit/s")
	b.ReportMetric(tcp, "iperf3-tcp-Mbit/s")
	b.ReportMetric(udp, "iperf3-udp-Mbit/s")
	b.ReportMetric(raw, "quic-raw-Mbit/s")
	b.ReportMetric(100*mbps/tcp, "%-of-tcp")
	b.Logf("pr-1 → pub through a port-restricted NAT, %d MiB: session stream %.0f Mbit/s; iperf3 TCP %.0f Mbit/s (session %.0f%% of it); "+
		"iperf3 UDP unlimited %.0f Mbit/s delivered; QUIC alone on the hosts' UDP sockets %.0f Mbit/s (session %.0f%% of it); race detector %v",
		size>>20, mbps, tcp, 100*mbps/tcp, udp, raw, 100*mbps/raw, raceEnabled)
}

// rawQUIC is the same transfer by QUIC straight on the hosts' UDP sockets, without
// connect under it: what QUIC itself manages on the path, with the kernel's UDP
// offloads (GSO) that a socket of its own allows.
func rawQUIC(t testing.TB, client, server *netlab.Host, size int64) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	idc, _ := identity.Generate()
	ids, _ := identity.Generate()
	spc, err := server.ListenPacket(ctx, "udp4", netip.AddrPortFrom(server.IP(), 4433).String())
	if err != nil {
		t.Fatal(err)
	}
	cpc, err := client.ListenPacket(ctx, "udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	str, ctr := &quic.Transport{Conn: spc}, &quic.Transport{Conn: cpc}
	defer func() { str.Close(); ctr.Close(); spc.Close(); cpc.Close() }()
	stc, _ := tlsConfig(ids, newVerifier(idc.NodeID()), true)
	ctc, _ := tlsConfig(idc, newVerifier(ids.NodeID()), false)
	qcfg := &quic.Config{MaxStreamReceiveWindow: 16 << 20, MaxConnectionReceiveWindow: 32 << 20}
	ln, err := str.Listen(stc, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *quic.Conn, 1)
	go func() {
		c, _ := ln.Accept(ctx)
		accepted <- c
	}()
	cc, err := ctr.Dial(ctx, spc.LocalAddr(), ctc, qcfg)
	if err != nil {
		t.Fatalf("raw QUIC dial: %v", err)
	}
	sc := <-accepted
	if sc == nil {
		t.Fatal("raw QUIC: nothing accepted")
	}
	defer cc.CloseWithError(0, "")
	defer sc.CloseWithError(0, "")
	return transfer(t, &Session{qc: cc}, &Session{qc: sc}, size, 6)
}

// iperf3 runs iperf3 from client to server for 3 s, over TCP or UDP at no rate limit,
// and returns the receiver-side throughput in Mbit/s.
func iperf3(t testing.TB, client, server *netlab.Host, udp bool) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := server.Command(ctx, "iperf3", "-s", "-1", "-B", server.IP().String(), "-p", "5201")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Wait()
	args := []string{"-c", server.IP().String(), "-p", "5201", "-t", "3", "-J"}
	if udp {
		args = append(args, "-u", "-b", "0", "-l", "1280")
	}
	var out []byte
	var err error
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
			Sum struct { // UDP: the receiver's figure
				BitsPerSecond float64 `json:"bits_per_second"`
				LostPercent   float64 `json:"lost_percent"`
			} `json:"sum"`
		} `json:"end"`
	}
	for range 50 {
		out, err = client.Command(ctx, "iperf3", args...).Output()
		if err == nil && json.Unmarshal(out, &r) == nil && (r.End.SumReceived.BitsPerSecond > 0 || r.End.Sum.BitsPerSecond > 0) {
			break
		}
		time.Sleep(100 * time.Millisecond) // the server not listening yet
	}
	bps := r.End.SumReceived.BitsPerSecond
	if udp {
		bps = r.End.Sum.BitsPerSecond * (1 - r.End.Sum.LostPercent/100)
	}
	if bps == 0 {
		srv.Process.Kill()
		t.Fatalf("iperf3: %v\n%s", err, out)
	}
	return bps / 1e6
}

// logUDPErrors logs the hosts' UDP receive-buffer drops, with PEERLINK_LAB_DEBUG set:
// where a slow transfer loses its packets.
func logUDPErrors(t *testing.T, hosts ...*netlab.Host) {
	if os.Getenv("PEERLINK_LAB_DEBUG") == "" {
		return
	}
	for _, h := range hosts {
		out, err := h.Run(context.Background(), "cat", "/proc/net/snmp")
		t.Logf("%s: %v\n%s", h.Name, err, out)
	}
}
