// Package portmaptest runs Debian's miniupnpd on a kernel-lab NAT router, for tests of
// port mapping against a real gateway.
package portmaptest

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"peerlink/netlab"
)

// Router is miniupnpd (nftables backend) running on a kernel-lab site's NAT router,
// with PCP, NAT-PMP and UPnP IGD on the LAN side.
//
// Two things stand between a stock miniupnpd and the lab. The lab's addresses are in
// 203.0.113.0/24 (TEST-NET-3), which miniupnpd calls reserved and refuses to forward
// to unless STUN shows the router is not itself behind a restrictive NAT; so the lab
// server must run an RFC 5780 STUN server (given to Start) and the router lets its own
// STUN traffic through unchanged. And the lab's forward chain drops new inbound flows,
// so it gets the rule any router with port forwarding has: accept what was
// destination-NATed.
type Router struct {
	Lab  *netlab.Lab
	Site *netlab.Site
	// Router is the site's NAT router, where miniupnpd runs; Host the site's first
	// host; Gateway the router's address on that host's LAN.
	Router, Host *netlab.Host
	Gateway      netip.Addr
	// IGDv1 is whether the running miniupnpd describes itself as IGDv1.
	IGDv1 bool

	stun   netip.AddrPort
	dir    string
	bin    string
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

// Start runs miniupnpd on site's router; stun is the lab server's RFC 5780 STUN
// server (primary address; the alternate is the server's second IP on stun's port + 1).
// The caller must be root with miniupnpd installed (Debian miniupnpd-nftables): a
// missing binary fails the test. miniupnpd stops when the test ends.
func Start(t testing.TB, lab *netlab.Lab, site *netlab.Site, stun netip.AddrPort) *Router {
	t.Helper()
	bin, err := exec.LookPath("miniupnpd")
	if err != nil {
		bin = "/usr/sbin/miniupnpd"
		if _, serr := os.Stat(bin); serr != nil {
			t.Fatalf("running as root but miniupnpd is missing (apt-get install -y miniupnpd-nftables): %v", err)
		}
	}
	if len(site.Routers) == 0 {
		t.Fatalf("portmaptest: site %s has no router", site.Name)
	}
	r := &Router{Lab: lab, Site: site, Router: site.Routers[0], Host: site.Host(), dir: t.TempDir(), bin: bin, stun: stun}
	hostIP := r.Host.IP().As4()
	hostIP[3] = 1
	r.Gateway = netip.AddrFrom4(hostIP)

	ip1, ip2 := lab.Server.IPs[0], lab.Server.IPs[1]
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
`, ip1, ip2, stun.Port(), stun.Port()+1, site.PublicIP)
	cmd := r.Router.Command(context.Background(), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("router nftables for miniupnpd: %v\n%s", err, out)
	}
	r.Start(t, false)
	t.Cleanup(func() {
		r.Stop()
		if t.Failed() {
			t.Logf("miniupnpd log:\n%s", r.Log())
		}
	})
	return r
}

// Log is what miniupnpd printed since it last started.
func (r *Router) Log() string {
	if r.log == nil {
		return ""
	}
	return r.log.String()
}

// Start (re)starts miniupnpd and waits until STUN has enabled port forwarding and both
// the HTTP and NAT-PMP/PCP servers listen. igdv1 makes it describe itself as IGDv1.
func (r *Router) Start(t testing.TB, igdv1 bool) {
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
`, r.stun.Addr(), r.stun.Port(), v1, filepath.Join(r.dir, "leases"))
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	log := &lockedBuffer{}
	r.IGDv1 = igdv1
	cmd := r.Router.Command(context.Background(), r.bin, "-d", "-f", conf, "-P", filepath.Join(r.dir, "miniupnpd.pid"))
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
			r.Stop()
			t.Fatalf("miniupnpd did not enable port forwarding within 15 s:\n%s", s)
		}
	}
}

// Stop ends miniupnpd, politely first so it removes its rules.
func (r *Router) Stop() {
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

// Rules lists the router's miniupnpd table.
func (r *Router) Rules(t testing.TB) string {
	t.Helper()
	out, err := r.Router.Run(context.Background(), "nft", "list", "table", "inet", "miniupnpd")
	if err != nil {
		t.Fatalf("listing router rules: %v", err)
	}
	return string(out)
}
