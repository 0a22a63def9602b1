package portmap

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/stun"
)

// miniupnpdRouter is Debian's miniupnpd (nftables backend) running on a kernel-lab
// symmetric NAT router, with PCP, NAT-PMP and UPnP IGD on the LAN side.
//
// Two things stand between a stock miniupnpd and the lab. The lab's addresses are in
// 203.0.113.0/24 (TEST-NET-3), which miniupnpd calls reserved and refuses to forward
// to unless STUN shows the router is not itself behind a restrictive NAT; so the lab
// server runs an RFC 5780 STUN server and the router lets its own STUN traffic through
// unchanged. And the lab's forward chain drops new inbound flows, so it gets the rule
// any router with port forwarding has: accept what was destination-NATed.
type miniupnpdRouter struct {
	lab    *netlab.Lab
	site   *netlab.Site
	router *netlab.Host
	host   *netlab.Host
	gw     netip.Addr
	dir    string

	bin    string
	igdv1  bool
	proc   *os.Process
	exited chan struct{}
	log    *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

const (
	stunPort    = 3478
	stunAltPort = 3479
)

func startMiniupnpdLab(t *testing.T) *miniupnpdRouter {
	t.Helper()
	netlabtest.Need(t)
	bin, err := exec.LookPath("miniupnpd")
	if err != nil {
		bin = "/usr/sbin/miniupnpd"
		if _, serr := os.Stat(bin); serr != nil {
			t.Fatalf("running as root but miniupnpd is missing (apt-get install -y miniupnpd-nftables): %v", err)
		}
	}
	lab := netlabtest.Start(t, netlab.Config{Sites: []netlab.SiteConfig{{Kind: netlab.KindSymmetric}}})
	site := lab.Sites[0]
	r := &miniupnpdRouter{lab: lab, site: site, router: site.Routers[0], host: site.Host(), dir: t.TempDir()}
	hostIP := r.host.IP().As4()
	hostIP[3] = 1
	r.gw = netip.AddrFrom4(hostIP)

	ip1, ip2 := lab.Server.IPs[0], lab.Server.IPs[1]
	s, err := stun.Listen(context.Background(), stun.Config{
		Listen: netip.AddrPortFrom(ip1, stunPort).String(), AltIP: ip2, AltPort: stunAltPort,
		Net: lab.Server, RateLimit: stun.RateLimit{Disabled: true}, SocketsPerAddr: 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background()) }()
	t.Cleanup(func() { s.Close(); <-served })

	rules := fmt.Sprintf(`table inet miniupnpd {
	chain miniupnpd {
	}
	chain prerouting {
		type nat hook prerouting priority dstnat - 10; policy accept;
		jump prerouting_miniupnpd
	}
	chain postrouting {
		type nat hook postrouting priority srcnat - 10; policy accept;
		jump postrouting_miniupnpd
	}
	chain prerouting_miniupnpd {
	}
	chain postrouting_miniupnpd {
	}
}
insert rule ip peerlink forward iifname "wan" ct status dnat accept
insert rule ip peerlink input iifname "wan" ip saddr { %[1]s, %[2]s } udp sport { %[3]d, %[4]d } accept
insert rule ip peerlink postrouting oifname "wan" ip saddr %[5]s udp dport { %[3]d, %[4]d } accept
`, ip1, ip2, stunPort, stunAltPort, site.PublicIP)
	cmd := r.router.Command(context.Background(), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("router nftables for miniupnpd: %v\n%s", err, out)
	}
	r.bin = bin
	r.start(t, false)
	t.Cleanup(func() {
		r.stop()
		if t.Failed() {
			t.Logf("miniupnpd log:\n%s", r.log.String())
		}
	})
	return r
}

// start runs miniupnpd and waits until STUN has enabled port forwarding and both the
// HTTP and NAT-PMP/PCP servers listen. igdv1 makes it describe itself as IGDv1.
func (r *miniupnpdRouter) start(t *testing.T, igdv1 bool) {
	t.Helper()
	conf := filepath.Join(r.dir, "miniupnpd.conf")
	v1 := "no"
	if igdv1 {
		v1 = "yes"
	}
	body := fmt.Sprintf(`ext_ifname=wan
listening_ip=lan0
http_port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
ext_perform_stun=yes
ext_stun_host=%s
ext_stun_port=%d
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
uuid=6c1f0a52-7d0e-4b43-9b8e-5a0f1e2d3c4b
force_igd_desc_v1=%s
lease_file=%s
notify_interval=60
allow 1024-65535 10.0.0.0/8 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
`, r.lab.Server.IPs[0], stunPort, v1, filepath.Join(r.dir, "leases"))
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	log := &lockedBuffer{}
	r.igdv1 = igdv1
	cmd := r.router.Command(context.Background(), r.bin, "-d", "-f", conf, "-P", filepath.Join(r.dir, "miniupnpd.pid"))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting miniupnpd: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	r.proc, r.exited, r.log = cmd.Process, exited, log
	deadline := time.Now().Add(15 * time.Second)
	for {
		s := log.String()
		if strings.Contains(s, "Port forwarding is now enabled") && strings.Contains(s, "HTTP listening on port") && strings.Contains(s, "Listening for NAT-PMP/PCP traffic") {
			return
		}
		select {
		case <-exited:
			t.Fatalf("miniupnpd exited at start:\n%s", s)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.stop()
			t.Fatalf("miniupnpd did not enable port forwarding within 15 s:\n%s", s)
		}
	}
}

// stop ends miniupnpd, politely first so it removes its rules.
func (r *miniupnpdRouter) stop() {
	if r.proc == nil {
		return
	}
	r.proc.Signal(syscall.SIGTERM)
	select {
	case <-r.exited:
	case <-time.After(5 * time.Second):
		r.proc.Kill()
		<-r.exited
	}
	r.proc = nil
}

// rules lists the router's miniupnpd table.
func (r *miniupnpdRouter) rules(t *testing.T) string {
	t.Helper()
	out, err := r.router.Run(context.Background(), "nft", "list", "table", "inet", "miniupnpd")
	if err != nil {
		t.Fatalf("listing router rules: %v", err)
	}
	return string(out)
}

// config is a portmap Config for the site's host.
func (r *miniupnpdRouter) config(t *testing.T, protos ...Protocol) Config {
	return Config{
		Gateway:   r.gw,
		Protocols: protos,
		Lifetime:  10 * time.Minute,
		Timeout:   2 * time.Second,
		Net:       r.host,
		Dialer:    r.host,
		Logger:    testLogger(t),
	}
}

// reaches sends a datagram from the lab server (from a fresh port, so no earlier
// conntrack entry helps it) to dst and reports whether sock received it, directly from
// the server.
func (r *miniupnpdRouter) reaches(t *testing.T, dst netip.AddrPort, sock net.PacketConn) bool {
	t.Helper()
	ctx := context.Background()
	src, err := r.lab.Server.ListenPacket(ctx, "udp4", netip.AddrPortFrom(r.lab.Server.IPs[0], 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	msg := fmt.Appendf(nil, "hello %v", time.Now().UnixNano())
	buf := make([]byte, 1500)
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if _, err := src.WriteTo(msg, net.UDPAddrFromAddrPort(dst)); err != nil {
			t.Fatal(err)
		}
		sock.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		for {
			n, from, err := sock.ReadFrom(buf)
			if err != nil {
				break
			}
			if !bytes.Equal(buf[:n], msg) {
				continue
			}
			if got := from.(*net.UDPAddr).AddrPort(); got != src.LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Errorf("datagram arrived from %v, want the server's %v", got, src.LocalAddr())
			}
			return true
		}
	}
	return false
}

func TestMiniupnpd(t *testing.T) {
	r := startMiniupnpdLab(t)
	ctx := context.Background()
	var gw netip.Addr
	if err := r.host.Do(func() (err error) { gw, err = DefaultGateway(); return err }); err != nil || gw != r.gw {
		t.Errorf("DefaultGateway() in the host's namespace = %v, %v; want %v", gw, err, r.gw)
	}
	sock, err := r.host.ListenPacket(ctx, "udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	port := uint16(sock.LocalAddr().(*net.UDPAddr).Port)
	// Without a mapping the symmetric NAT lets nothing in.
	if r.reaches(t, netip.AddrPortFrom(r.site.PublicIP, port), sock) {
		t.Fatal("unsolicited datagram reached the host before any mapping")
	}

	for _, tc := range []struct {
		name    string
		protos  []Protocol
		maxV    int
		want    Protocol
		igdv1   bool // miniupnpd describes itself as IGDv1
		service string
		version int
	}{
		{"pcp", []Protocol{PCP}, 0, PCP, false, "", 0},
		{"nat-pmp", []Protocol{NATPMP}, 0, NATPMP, false, "", 0},
		{"upnp-igd2", []Protocol{UPnP}, 0, UPnP, false, wanIPService2, 2},
		{"upnp-igd2-as-v1", []Protocol{UPnP}, 1, UPnP, false, wanIPService2, 1},
		{"default-order", nil, 0, PCP, false, "", 0},
		{"upnp-igd1", []Protocol{UPnP}, 0, UPnP, true, wanIPService1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.igdv1 != r.igdv1 {
				r.stop()
				r.start(t, tc.igdv1)
			}
			cfg := r.config(t, tc.protos...)
			cfg.UPnPMaxVersion = tc.maxV
			clk := clock.NewFake(time.Now())
			cfg.Clock = clk
			m, err := Map(ctx, cfg, port)
			if err != nil {
				t.Fatalf("Map: %v", err)
			}
			defer m.Close()
			if m.Protocol() != tc.want {
				t.Errorf("Protocol() = %v, want %v", m.Protocol(), tc.want)
			}
			if tc.service != "" {
				if got := m.c.(*upnpClient).svc; got.Type != tc.service || got.Version != tc.version {
					t.Errorf("UPnP service %q used as v%d, want %q as v%d", got.Type, got.Version, tc.service, tc.version)
				}
			}
			ext := m.External()
			if ext.Addr() != r.site.PublicIP || ext.Port() == 0 {
				t.Fatalf("External() = %v, want the router's public address %v", ext, r.site.PublicIP)
			}
			rules := r.rules(t)
			if !strings.Contains(rules, fmt.Sprintf("%s:%d", r.host.IP(), port)) {
				t.Errorf("router has no rule forwarding to %v:%d:\n%s", r.host.IP(), port, rules)
			}
			if !r.reaches(t, ext, sock) {
				t.Fatalf("datagram from the server to %v did not reach the host\nrouter rules:\n%s", ext, rules)
			}

			// Half the lifetime later the mapping renews itself on the router.
			before := m.Expires()
			clk.Advance(cfg.Lifetime / 2)
			waitFor(t, func() bool { return m.Expires().After(before) || m.Err() != nil })
			if err := m.Err(); err != nil {
				t.Fatalf("renewal: %v", err)
			}
			if got := m.External(); got != ext {
				t.Errorf("renewal moved the mapping from %v to %v", ext, got)
			}
			if !r.reaches(t, m.External(), sock) {
				t.Fatal("after renewal a datagram from the server did not reach the host")
			}

			if err := m.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if err := m.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			if rules := r.rules(t); strings.Contains(rules, fmt.Sprintf("%s:%d", r.host.IP(), port)) {
				t.Errorf("after Close the router still forwards to the host:\n%s", rules)
			}
			if r.reaches(t, ext, sock) {
				t.Error("after Close a datagram to the old mapping still reached the host")
			}
		})
	}

	// The router allows mappings of ports 1024-65535 only, and UPnP's AddPortMapping
	// says no at once. (PCP and NAT-PMP requests for a forbidden port make miniupnpd try
	// every other external port first, for longer than a client waits; their refusal
	// codes are covered against the in-test servers.)
	t.Run("refused-upnp", func(t *testing.T) {
		if r.igdv1 {
			r.stop()
			r.start(t, false)
		}
		cfg := r.config(t, UPnP)
		cfg.UPnPMaxVersion = 1
		m, err := Map(ctx, cfg, 80)
		if err == nil {
			m.Close()
			t.Fatalf("mapped port 80 at %v against the router's rules", m.External())
		}
		var re *ResultError
		if !errors.Is(err, ErrRefused) || !errors.As(err, &re) {
			t.Fatalf("error %v, want a ResultError wrapping ErrRefused", err)
		}
		t.Logf("refusal: %v", err)
	})
}
