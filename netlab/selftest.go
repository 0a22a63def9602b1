package netlab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"peerlink/internal/probe"
	"peerlink/nat"
)

// Probe server ports on the lab's server. TCP 443 is the port the UDP-blocking firewall
// lets out; TCP 80 is one it does not.
const (
	ProbePort    = 3478
	ProbeAltPort = 3479
	tcpAllowed   = 443
	tcpOther     = 80
)

// SelfTestOptions tunes SelfTest. The zero value suits a lab with perfect links.
type SelfTestOptions struct {
	// Timeout is how long a probe waits for each answer; zero means 300ms.
	Timeout time.Duration
	// Attempts is how often a probe is sent before it counts as filtered; zero means 3.
	// Raise it for lossy links.
	Attempts int
}

// tcpTimeout is how long a TCP check may take: as long as a UDP probe may, so lossy
// links get time for SYN retransmissions (the first after 1 s), and at least a second.
func (o SelfTestOptions) tcpTimeout() time.Duration {
	t, n := o.Timeout, o.Attempts
	if t <= 0 {
		t = 300 * time.Millisecond
	}
	if n <= 0 {
		n = 3
	}
	return max(time.Second, t*time.Duration(n))
}

// Check is the self-test verdict on one NAT as seen from one host.
type Check struct {
	Site string `json:"site"`
	Kind Kind   `json:"kind"`
	// Router names the NAT under test and its namespace.
	Router string `json:"router"`
	// Host is the probing host.
	Host     string      `json:"host"`
	Claimed  nat.Profile `json:"claimed"`
	Measured nat.Profile `json:"measured"`
	// Evidence is what the probes saw, in words.
	Evidence string `json:"evidence"`
	// TCP is the outcome of the TCP connects to the server's ports 443 and 80.
	TCP string `json:"tcp,omitempty"`
	// Problems is empty when the kernel behaves as claimed.
	Problems []string `json:"problems,omitempty"`
}

// OK reports whether the NAT behaved as claimed.
func (c Check) OK() bool { return len(c.Problems) == 0 }

// SelfTest probes every site of the lab, from real sockets in the hosts' namespaces to a
// probe server on the two-address server, and compares what the kernel did with what
// each kind claims. For a KindCGNAT site it also checks the carrier NAT alone (from its
// subscriber host); for sites with two or more hosts behind an endpoint-independent
// mapping it checks that the mapping holds when both hosts use the same local port.
// Checks come back in site order; a failed check is not an error. The error is for
// failing to run the test at all.
func SelfTest(ctx context.Context, l *Lab, opts SelfTestOptions) ([]Check, error) {
	srv, err := probe.Listen(ctx, probe.ServerConfig{
		Listener: l.Server,
		Endpoints: probe.Endpoints{
			Primary: l.Server.IPs[0], Alternate: l.Server.IPs[1],
			Port: ProbePort, AltPort: ProbeAltPort,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("netlab: self-test probe server: %w", err)
	}
	defer srv.Close()
	tcp, err := startTCPServer(ctx, l.Server, l.Server.IPs[0], tcpAllowed, tcpOther)
	if err != nil {
		return nil, err
	}
	defer tcp.Close()

	type job struct {
		site   *Site
		router *Host
		host   *Host
		claim  nat.Profile
	}
	var jobs []job
	for _, s := range l.Sites {
		var router *Host
		if len(s.Routers) > 0 {
			router = s.Routers[0]
		}
		jobs = append(jobs, job{s, router, s.Host(), s.Claim()})
		if s.Subscriber != nil {
			jobs = append(jobs, job{s, s.Routers[len(s.Routers)-1], s.Subscriber, carrierClaim()})
		}
	}
	checks := make([]Check, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() {
			c := &checks[i]
			*c = Check{Site: j.site.Name, Kind: j.site.Kind, Host: j.host.Name, Claimed: j.claim, Router: "none (public host)"}
			if j.router != nil {
				c.Router = fmt.Sprintf("%s (netns %s)", j.router.Name, j.router.NS)
			}
			client := &probe.Client{
				Listener: j.host, Server: srv.Endpoints(), LocalIP: j.host.IP(),
				Timeout: opts.Timeout, Attempts: opts.Attempts,
			}
			checkNAT(ctx, c, client)
			if j.host == j.site.Host() {
				checkTCP(ctx, c, j.host, l.Server.IPs[0], opts.tcpTimeout())
				if len(j.site.Hosts) > 1 && j.claim.Mapping == nat.MappingEI && !j.claim.Open {
					checkSharedPort(ctx, c, j.site, client)
				}
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return checks, err
	}
	return checks, nil
}

func checkNAT(ctx context.Context, c *Check, client *probe.Client) {
	r, err := client.Measure(ctx)
	c.Evidence = r.String()
	c.Measured = r.Profile()
	if err != nil {
		c.Problems = append(c.Problems, fmt.Sprintf("probing failed: %v", err))
		return
	}
	if !SameBehaviour(c.Claimed, c.Measured) {
		c.Problems = append(c.Problems, fmt.Sprintf("claims %s but the kernel did %s (%s)", ClaimString(c.Claimed), ClaimString(c.Measured), r))
	}
}

// checkTCP connects to the server's ports 443 and 80: every kind lets both through
// except KindUDPBlocked, which allows 443 only.
func checkTCP(ctx context.Context, c *Check, h *Host, server netip.Addr, timeout time.Duration) {
	only443 := c.Kind == KindUDPBlocked
	var words []string
	for _, port := range []uint16{tcpAllowed, tcpOther} {
		err := tcpHello(ctx, h, netip.AddrPortFrom(server, port), timeout)
		want := port == tcpAllowed || !only443
		switch {
		case err == nil && want:
			words = append(words, fmt.Sprintf("tcp/%d ok", port))
		case err != nil && !want:
			words = append(words, fmt.Sprintf("tcp/%d blocked", port))
		case err == nil:
			words = append(words, fmt.Sprintf("tcp/%d OPEN", port))
			c.Problems = append(c.Problems, fmt.Sprintf("TCP to port %d got through; the firewall should allow only 443", port))
		default:
			words = append(words, fmt.Sprintf("tcp/%d FAILED", port))
			c.Problems = append(c.Problems, fmt.Sprintf("TCP to %s failed: %v", netip.AddrPortFrom(server, port), err))
		}
	}
	c.TCP = strings.Join(words, ", ")
}

func tcpHello(ctx context.Context, h *Host, to netip.AddrPort, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := h.DialContext(ctx, "tcp4", to.String())
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "peerlink-lab ") {
		return fmt.Errorf("unexpected greeting %q", line)
	}
	return nil
}

// checkSharedPort binds the same local port on two hosts behind one NAT and checks that
// each keeps one external port for every destination, and that the two differ. The order
// matters: the second host first talks to a destination the first has not used, where
// the first host's external port is free as far as the kernel's tuple check goes. Stock
// masquerade hands it out again there, and then has to move both hosts to new ports as
// they reach each other's destinations: it looks endpoint-independent only until local
// ports collide.
func checkSharedPort(ctx context.Context, c *Check, s *Site, base *probe.Client) {
	var conns [2]net.PacketConn
	var clients [2]*probe.Client
	defer func() {
		for _, conn := range conns {
			if conn != nil {
				conn.Close()
			}
		}
	}()
	var port uint16
	for range 20 {
		port = uint16(40000 + rand.IntN(20000))
		ok := true
		for i := range 2 {
			cl := *base
			cl.Listener, cl.LocalIP = s.Hosts[i], s.Hosts[i].IP()
			clients[i] = &cl
			conn, err := cl.ListenPort(ctx, port)
			if err != nil {
				ok = false
				break
			}
			conns[i] = conn
		}
		if ok {
			break
		}
		for i, conn := range conns {
			if conn != nil {
				conn.Close()
				conns[i] = nil
			}
		}
	}
	if conns[1] == nil {
		c.Problems = append(c.Problems, "shared-port check: could not bind one port on two hosts")
		return
	}
	ep := base.Server
	dsts := []netip.AddrPort{ep.Addr(false, false), ep.Addr(true, false), ep.Addr(true, true)}
	steps := [][2]int{{0, 0}, {1, 1}, {0, 1}, {1, 0}, {0, 2}, {1, 2}} // {host, destination}
	var mapped [2][3]netip.AddrPort
	var seen []string
	for _, st := range steps {
		h, d := st[0], st[1]
		a, err := clients[h].Transact(ctx, conns[h], dsts[d], false, false)
		if err != nil {
			c.Problems = append(c.Problems, fmt.Sprintf("shared-port check: host %s to %s: %v", s.Hosts[h].Name, dsts[d], err))
			return
		}
		mapped[h][d] = a.Mapped
		seen = append(seen, fmt.Sprintf("h%d->%s seen as %s", h, dsts[d], a.Mapped))
	}
	c.Evidence += fmt.Sprintf("; shared local port %d: %s", port, strings.Join(seen, ", "))
	for h := range 2 {
		for d := 1; d < len(dsts); d++ {
			if mapped[h][d] != mapped[h][0] {
				c.Problems = append(c.Problems, fmt.Sprintf("mapping not endpoint-independent when two hosts share local port %d: %s was seen as %s by %s and as %s by %s",
					port, s.Hosts[h].Name, mapped[h][0], dsts[0], mapped[h][d], dsts[d]))
				break
			}
		}
	}
	for d := range dsts {
		for e := range dsts {
			if mapped[0][d] == mapped[1][e] {
				c.Problems = append(c.Problems, fmt.Sprintf("two hosts sharing local port %d got the same external address %s", port, mapped[0][d]))
				goto inbound
			}
		}
	}
inbound:
	if c.Claimed.Filtering == nat.FilteringEI {
		// Unsolicited traffic to the second host's mapping must reach the second host.
		if _, err := clients[1].Transact(ctx, conns[1], ep.Addr(false, false), true, true); err != nil {
			c.Problems = append(c.Problems, fmt.Sprintf("shared-port check: inbound to %s's mapping %s did not reach it: %v", s.Hosts[1].Name, mapped[1][0], err))
		}
	}
}

// tcpServer greets every connection with one line and closes it.
type tcpServer struct {
	ls []net.Listener
	wg sync.WaitGroup
}

func startTCPServer(ctx context.Context, h *Host, ip netip.Addr, ports ...uint16) (*tcpServer, error) {
	t := &tcpServer{}
	for _, p := range ports {
		ln, err := h.Listen(ctx, "tcp4", netip.AddrPortFrom(ip, p).String())
		if err != nil {
			t.Close()
			return nil, fmt.Errorf("netlab: self-test TCP server: %w", err)
		}
		t.ls = append(t.ls, ln)
		t.wg.Go(func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return // closed; any other accept error also ends the test server
				}
				fmt.Fprintf(conn, "peerlink-lab %s\n", conn.RemoteAddr())
				conn.Close()
			}
		})
	}
	return t, nil
}

func (t *tcpServer) Close() error {
	var errs []error
	for _, ln := range t.ls {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	t.wg.Wait()
	return errors.Join(errs...)
}

// SelfTestSites returns one site per kind (every kind when none are given), with two
// hosts behind each endpoint-independent NAT so the shared-port check runs.
func SelfTestSites(kinds ...Kind) []SiteConfig {
	if len(kinds) == 0 {
		kinds = AllKinds()
	}
	var sites []SiteConfig
	for _, k := range kinds {
		sc := SiteConfig{Kind: k}
		if c := k.Claim(); c.Mapping == nat.MappingEI && !c.Open {
			sc.Hosts = 2
		}
		sites = append(sites, sc)
	}
	return sites
}
