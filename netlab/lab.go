// Package netlab builds peerlink's kernel NAT lab: network namespaces joined by veth
// links, an internet with a two-address server, and sites behind nftables NATs.
package netlab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"peerlink/nat"
	"peerlink/nettype"
)

// NamePrefix starts the name of every namespace the lab creates: NamePrefix + run ID +
// "-" + node. Down removes namespaces by it.
const NamePrefix = "plab-"

// Errors.
var (
	// ErrNotRoot: building namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
	ErrNotRoot = errors.New("kernel NAT lab needs root (run as root or via make test)")
	// ErrClosed is returned by a closed lab's hosts.
	ErrClosed = errors.New("netlab: lab closed")
	// ErrLeftovers is wrapped when teardown finds namespaces or links it could not remove.
	ErrLeftovers = errors.New("netlab: teardown left resources behind")
)

// CmdError is a failed ip or nft command.
type CmdError struct {
	Args   []string
	Output string
	Err    error
}

func (e *CmdError) Error() string {
	return fmt.Sprintf("netlab: %s: %v: %s", strings.Join(e.Args, " "), e.Err, strings.TrimSpace(e.Output))
}

func (e *CmdError) Unwrap() error { return e.Err }

// Link is a site's link to the internet.
//
// The zero value is a perfect link.
type Link struct {
	// Loss is the percentage (0-100) of packets dropped in each direction.
	Loss int
	// Delay is added to every frame in each direction by a userspace relay (this kernel
	// has no netem). Zero means a plain veth.
	Delay time.Duration
}

// SiteConfig describes one site: hosts behind a NAT of some kind.
type SiteConfig struct {
	// Name is unique within the lab: lower-case letters, digits and '-', at most 20.
	// Empty means the kind's name.
	Name string
	Kind Kind
	// Hosts is how many hosts share the NAT; zero means 1. A KindNone site has one host.
	Hosts int
	Link  Link
}

// Config describes a lab.
//
// The zero value builds one site of every kind, each with one host and a perfect link.
type Config struct {
	Sites []SiteConfig
	// IPv6 adds global IPv6 to the lab next to its IPv4 (see ipv6.go): the server gets
	// ServerIPv6, each site a /64 on its LAN behind a stateful IPv6 firewall (routers
	// do not NAT IPv6), KindNone hosts an address on their public link. False means an
	// IPv4-only lab, with IPv6 off in every namespace.
	IPv6 bool
	// Logger receives progress; nil means quiet.
	Logger *slog.Logger
}

// Lab is a running kernel NAT lab. Close tears it down.
type Lab struct {
	// ID is the run ID in every namespace name.
	ID string
	// Internet is the router every site and the server hang off.
	Internet *Host
	// Server is a public host with two addresses (IPs[0] and IPs[1]) for NAT probing.
	Server *Host
	Sites  []*Site

	ipv6       bool
	log        *slog.Logger
	namespaces []string
	lockFile   *os.File
	closers    closers

	mu      sync.Mutex // guards loss settings and delays
	delays  []*delayLink
	delayNS *Host // created with the first delayed link

	closeOnce sync.Once
	closeErr  error
}

// Site is a set of hosts behind one NAT (or none).
type Site struct {
	Name string
	Kind Kind
	// Hosts are the site's end hosts. They share the NAT.
	Hosts []*Host
	// Routers are the NATs from the hosts outwards: the home router, then (for KindCGNAT)
	// the carrier-grade NAT. Empty for KindNone.
	Routers []*Host
	// Subscriber is, for KindCGNAT, a host directly behind the carrier-grade NAT with no
	// home router: it measures the carrier NAT alone.
	Subscriber *Host
	// PublicIP is the address the internet sees the site's traffic come from.
	PublicIP netip.Addr
	// IPv6Prefix is, in an IPv6 lab, the site's global /64 (its hosts' addresses are in
	// it); invalid otherwise.
	IPv6Prefix netip.Prefix

	lab    *Lab
	ifname string // the site's interface in the internet namespace
	link   Link
}

var _ nettype.PacketListener = (*Host)(nil)

// Host returns the site's first host.
func (s *Site) Host() *Host { return s.Hosts[0] }

// Claim is the behaviour the site's hosts should measure.
func (s *Site) Claim() nat.Profile { return s.Kind.Claim() }

// Link returns the site's current link settings.
func (s *Site) Link() Link {
	s.lab.mu.Lock()
	defer s.lab.mu.Unlock()
	return s.link
}

// Addressing. Every lab is its own world, so two labs may use the same addresses.
var (
	internetGW = netip.MustParseAddr("203.0.113.1")
	serverIPs  = [2]netip.Addr{netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("203.0.113.11")}
)

const maxSites = 100

// publicIP is site i's address on the internet: 203.0.113.20 + i.
func publicIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{203, 0, 113, byte(20 + i)}) }

// subnet returns the /24 a.b.c.0.
func subnet(a, b, c int) [4]byte { return [4]byte{byte(a), byte(b), byte(c), 0} }

func addrIn(n [4]byte, host byte) netip.Addr {
	n[3] = host
	return netip.AddrFrom4(n)
}

var siteName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,19}$`)

func (c Config) sites() ([]SiteConfig, error) {
	sites := slices.Clone(c.Sites)
	if len(sites) == 0 {
		for _, k := range AllKinds() {
			sites = append(sites, SiteConfig{Kind: k})
		}
	}
	if len(sites) > maxSites {
		return nil, fmt.Errorf("netlab: %d sites, at most %d", len(sites), maxSites)
	}
	seen := map[string]bool{"inet": true, "srv": true, "dly": true}
	for i := range sites {
		s := &sites[i]
		if s.Kind <= KindUnknown || int(s.Kind) >= len(kindNames) {
			return nil, fmt.Errorf("netlab: site %d: unknown kind %d", i, s.Kind)
		}
		if s.Name == "" {
			s.Name = s.Kind.String()
		}
		if !siteName.MatchString(s.Name) || seen[s.Name] {
			return nil, fmt.Errorf("netlab: site name %q: want a unique name of lower-case letters, digits and '-', at most 20", s.Name)
		}
		seen[s.Name] = true
		if s.Hosts == 0 {
			s.Hosts = 1
		}
		if s.Hosts < 1 || s.Hosts > 8 || (s.Kind == KindNone && s.Hosts != 1) {
			return nil, fmt.Errorf("netlab: site %s: %d hosts (1-8, and 1 for kind none)", s.Name, s.Hosts)
		}
		if s.Link.Loss < 0 || s.Link.Loss > 100 || s.Link.Delay < 0 {
			return nil, fmt.Errorf("netlab: site %s: bad link %+v", s.Name, s.Link)
		}
	}
	return sites, nil
}

// CheckRoot returns ErrNotRoot unless the process can build namespaces.
func CheckRoot() error {
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("netlab: %s not found: %w", tool, err)
		}
	}
	return nil
}

// New builds a lab. On any failure, and if ctx is cancelled while building, everything
// built so far is torn down before New returns.
func New(ctx context.Context, cfg Config) (_ *Lab, err error) {
	if err := CheckRoot(); err != nil {
		return nil, err
	}
	sites, err := cfg.sites()
	if err != nil {
		return nil, err
	}
	l := &Lab{log: cfg.Logger, ipv6: cfg.IPv6}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if err := l.claimID(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}
	}()
	start := time.Now()
	l.log.Info("building kernel NAT lab", "run", l.ID, "sites", len(sites))
	if err := l.build(ctx, sites); err != nil {
		if cerr := ctx.Err(); cerr != nil {
			// The commands died of the cancellation; that is the news.
			return nil, fmt.Errorf("netlab: building lab %s interrupted: %w", l.ID, cerr)
		}
		return nil, err
	}
	l.log.Info("lab ready", "run", l.ID, "namespaces", len(l.namespaces), "took", time.Since(start).Round(time.Millisecond))
	return l, nil
}

// lockDir holds one lock file per live lab; the owner holds an flock on it, so Down can
// tell a crashed run's leftovers from a live lab.
const lockDir = "/run/peerlink/lab"

func (l *Lab) claimID() error {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return fmt.Errorf("netlab: %w", err)
	}
	for range 10 {
		var b [3]byte
		rand.Read(b[:])
		id := hex.EncodeToString(b[:])
		if existing, _ := listNamespaces(NamePrefix + id + "-"); len(existing) > 0 {
			continue
		}
		f, err := os.OpenFile(filepath.Join(lockDir, id+".lock"), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("netlab: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			continue
		}
		fmt.Fprintf(f, "%d\n", os.Getpid())
		l.ID, l.lockFile = id, f
		return nil
	}
	return errors.New("netlab: could not pick a free run ID")
}

func (l *Lab) nsName(node string) string { return NamePrefix + l.ID + "-" + node }

// run executes a command, feeding it stdin when not empty.
func run(ctx context.Context, stdin string, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return &CmdError{Args: append([]string{name}, args...), Output: string(out), Err: err}
	}
	return nil
}

// ipBatch runs ip commands in one namespace with one process.
func ipBatch(ctx context.Context, ns string, lines ...string) error {
	return run(ctx, strings.Join(lines, "\n")+"\n", "ip", "-n", ns, "-batch", "-")
}

func nftApply(ctx context.Context, ns, rules string) error {
	return run(ctx, rules, "ip", "netns", "exec", ns, "nft", "-f", "-")
}

// addNode creates a namespace with loopback up, IPv6 off (no router solicitations or
// neighbour discovery noise) and IPv4 forwarding as asked. In an IPv6 lab, IPv6 is on
// instead, quietly (ipv6Sysctls), except in the delay relays' namespace, which only
// passes frames along.
func (l *Lab) addNode(ctx context.Context, name, node string, ips []netip.Addr, forward bool) (*Host, error) {
	ns := l.nsName(node)
	if err := run(ctx, "", "ip", "netns", "add", ns); err != nil {
		return nil, err
	}
	l.namespaces = append(l.namespaces, ns)
	fwd := "0"
	if forward {
		fwd = "1"
	}
	err := inNetns(ns, func() error {
		sysctls := [][2]string{
			{"ipv6/conf/all/disable_ipv6", "1"},
			{"ipv6/conf/default/disable_ipv6", "1"},
			{"ipv4/ip_forward", fwd},
		}
		if l.ipv6 && node != delayNode {
			sysctls = append(sysctls, ipv6Sysctls(forward)...)
		}
		for _, kv := range sysctls {
			if err := os.WriteFile("/proc/sys/net/"+kv[0], []byte(kv[1]), 0); err != nil {
				return fmt.Errorf("netlab: %s: sysctl %s: %w", ns, kv[0], err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := ipBatch(ctx, ns, "link set lo up"); err != nil {
		return nil, err
	}
	return &Host{Name: name, NS: ns, IPs: ips, lab: l}, nil
}

// veth creates a veth pair straight into two namespaces, so nothing ever appears in the
// root namespace and names only need to be unique per namespace.
func veth(ctx context.Context, nsA, ifA, nsB, ifB string) error {
	return run(ctx, "", "ip", "-n", nsA, "link", "add", ifA, "type", "veth", "peer", "name", ifB, "netns", nsB)
}

// publicLink joins a node to the internet router as a point-to-point /32: the internet
// side carries the gateway address on every such interface and a host route back.
func (l *Lab) publicLink(ctx context.Context, h *Host, ifname string, ip netip.Addr, inetIf string, link Link) error {
	if link.Delay > 0 {
		if err := l.delayedVeth(ctx, h.NS, ifname, inetIf, link.Delay); err != nil {
			return err
		}
	} else if err := veth(ctx, h.NS, ifname, l.Internet.NS, inetIf); err != nil {
		return err
	}
	if err := ipBatch(ctx, l.Internet.NS,
		fmt.Sprintf("addr add %s/32 dev %s", internetGW, inetIf),
		fmt.Sprintf("link set %s up", inetIf),
		fmt.Sprintf("route add %s/32 dev %s", ip, inetIf),
	); err != nil {
		return err
	}
	return ipBatch(ctx, h.NS,
		fmt.Sprintf("addr add %s/32 dev %s", ip, ifname),
		fmt.Sprintf("link set %s up", ifname),
		fmt.Sprintf("route add %s/32 dev %s scope link", internetGW, ifname),
		fmt.Sprintf("route add default via %s dev %s", internetGW, ifname),
	)
}

// privateLink joins a router's LAN port to a node's interface on a /24: router .1,
// node .2, node's default route via the router.
func privateLink(ctx context.Context, router *Host, lanIf string, h *Host, ifname string, net24 [4]byte) error {
	if err := veth(ctx, router.NS, lanIf, h.NS, ifname); err != nil {
		return err
	}
	if err := ipBatch(ctx, router.NS,
		fmt.Sprintf("addr add %s/24 dev %s", addrIn(net24, 1), lanIf),
		fmt.Sprintf("link set %s up", lanIf),
	); err != nil {
		return err
	}
	return ipBatch(ctx, h.NS,
		fmt.Sprintf("addr add %s/24 dev %s", addrIn(net24, 2), ifname),
		fmt.Sprintf("link set %s up", ifname),
		fmt.Sprintf("route add default via %s", addrIn(net24, 1)),
	)
}

func (l *Lab) build(ctx context.Context, sites []SiteConfig) error {
	var err error
	if l.Internet, err = l.addNode(ctx, "internet", "inet", []netip.Addr{internetGW}, true); err != nil {
		return err
	}
	if l.Server, err = l.addNode(ctx, "server", "srv", serverIPs[:], false); err != nil {
		return err
	}
	if err := veth(ctx, l.Server.NS, "eth0", l.Internet.NS, "srv"); err != nil {
		return err
	}
	if err := ipBatch(ctx, l.Internet.NS,
		fmt.Sprintf("addr add %s/32 dev srv", internetGW),
		"link set srv up",
		fmt.Sprintf("route add %s/32 dev srv", serverIPs[0]),
		fmt.Sprintf("route add %s/32 dev srv", serverIPs[1]),
	); err != nil {
		return err
	}
	if err := ipBatch(ctx, l.Server.NS,
		fmt.Sprintf("addr add %s/32 dev eth0", serverIPs[0]),
		fmt.Sprintf("addr add %s/32 dev eth0", serverIPs[1]),
		"link set eth0 up",
		fmt.Sprintf("route add %s/32 dev eth0 scope link", internetGW),
		fmt.Sprintf("route add default via %s dev eth0", internetGW),
	); err != nil {
		return err
	}
	if l.ipv6 {
		if err := l.serverIPv6(ctx); err != nil {
			return err
		}
	}
	l.log.Info("internet and server up", "server", fmt.Sprintf("%s+%s", serverIPs[0], serverIPs[1]))

	for i, sc := range sites {
		if err := ctx.Err(); err != nil {
			return err
		}
		s, err := l.buildSite(ctx, i, sc)
		if err != nil {
			return fmt.Errorf("site %s: %w", sc.Name, err)
		}
		l.Sites = append(l.Sites, s)
		l.log.Info("site up", "site", s.Name, "kind", s.Kind, "public", s.PublicIP, "claims", ClaimString(s.Claim()))
	}
	return l.applyLoss(ctx)
}

func (l *Lab) buildSite(ctx context.Context, i int, sc SiteConfig) (*Site, error) {
	s := &Site{Name: sc.Name, Kind: sc.Kind, PublicIP: publicIP(i), lab: l, ifname: fmt.Sprintf("s%d", i), link: sc.Link}
	if sc.Kind == KindNone {
		h, err := l.addNode(ctx, s.Name+"/h0", s.Name+"-h0", []netip.Addr{s.PublicIP}, false)
		if err != nil {
			return nil, err
		}
		s.Hosts = []*Host{h}
		if err := l.publicLink(ctx, h, "eth0", s.PublicIP, s.ifname, sc.Link); err != nil {
			return nil, err
		}
		if l.ipv6 {
			return s, l.openIPv6(ctx, s, i, h)
		}
		return s, nil
	}

	// The outermost router holds the public address.
	outerName, outerNode := s.Name+"/router", s.Name+"-r"
	if sc.Kind == KindCGNAT {
		outerName, outerNode = s.Name+"/cgn", s.Name+"-cgn"
	}
	outer, err := l.addNode(ctx, outerName, outerNode, []netip.Addr{s.PublicIP}, true)
	if err != nil {
		return nil, err
	}
	if err := l.publicLink(ctx, outer, wanIf, s.PublicIP, s.ifname, sc.Link); err != nil {
		return nil, err
	}
	home := outer
	homeWAN := s.PublicIP
	if sc.Kind == KindCGNAT {
		carrierNet := subnet(100, 64, i+1)
		homeWAN = addrIn(carrierNet, 2)
		home, err = l.addNode(ctx, s.Name+"/router", s.Name+"-r", []netip.Addr{homeWAN}, true)
		if err != nil {
			return nil, err
		}
		if err := privateLink(ctx, outer, "lan0", home, wanIf, carrierNet); err != nil {
			return nil, err
		}
		subNet := subnet(100, 65, i+1)
		sub, err := l.addNode(ctx, s.Name+"/subscriber", s.Name+"-sub", []netip.Addr{addrIn(subNet, 2)}, false)
		if err != nil {
			return nil, err
		}
		if err := privateLink(ctx, outer, "lan1", sub, "eth0", subNet); err != nil {
			return nil, err
		}
		s.Subscriber = sub
		s.Routers = []*Host{home, outer}
		cc := carrierClaim()
		if err := nftApply(ctx, outer.NS, eimRules(s.PublicIP, cc.Filtering, cc.Allocation)); err != nil {
			return nil, err
		}
	} else {
		s.Routers = []*Host{home}
	}
	for k := range sc.Hosts {
		lan := subnet(10, i+1, k)
		h, err := l.addNode(ctx, fmt.Sprintf("%s/h%d", s.Name, k), fmt.Sprintf("%s-h%d", s.Name, k), []netip.Addr{addrIn(lan, 2)}, false)
		if err != nil {
			return nil, err
		}
		if err := privateLink(ctx, home, fmt.Sprintf("lan%d", k), h, "eth0", lan); err != nil {
			return nil, err
		}
		s.Hosts = append(s.Hosts, h)
	}
	var rules string
	switch sc.Kind {
	case KindFullCone:
		rules = eimRules(homeWAN, nat.FilteringEI, nat.AllocationPP)
	case KindRestrictedCone:
		rules = eimRules(homeWAN, nat.FilteringHD, nat.AllocationPP)
	case KindPortRestricted, KindCGNAT:
		rules = eimRules(homeWAN, nat.FilteringPD, nat.AllocationPP)
	case KindSymmetric:
		rules = symmetricRules(homeWAN, false)
	case KindSymmetricSequential:
		rules = symmetricRules(homeWAN, true)
	case KindUDPBlocked:
		rules = firewallRules(homeWAN)
	}
	if err := nftApply(ctx, home.NS, rules); err != nil {
		return nil, err
	}
	if l.ipv6 {
		if err := l.siteIPv6(ctx, s, i, outer, home); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Site returns the site with the given name, or nil.
func (l *Lab) Site(name string) *Site {
	for _, s := range l.Sites {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// SetLoss changes the share of packets (0-100 percent) the site's internet link drops
// in each direction.
func (s *Site) SetLoss(ctx context.Context, percent int) error {
	if percent < 0 || percent > 100 {
		return fmt.Errorf("netlab: loss %d%%: want 0-100", percent)
	}
	s.lab.mu.Lock()
	old := s.link.Loss
	s.link.Loss = percent
	s.lab.mu.Unlock()
	if err := s.lab.applyLoss(ctx); err != nil {
		s.lab.mu.Lock()
		s.link.Loss = old
		s.lab.mu.Unlock()
		return err
	}
	return nil
}

// applyLoss writes the internet router's loss rules from the sites' links. Drops happen
// where a site's link meets the internet router, so they apply the same to every kind.
func (l *Lab) applyLoss(ctx context.Context) error {
	l.mu.Lock()
	loss := map[string]int{}
	for _, s := range l.Sites {
		loss[s.ifname] = s.link.Loss
	}
	l.mu.Unlock()
	if err := nftApply(ctx, l.Internet.NS, lossRules(loss)); err != nil {
		return err
	}
	if l.ipv6 {
		return nftApply(ctx, l.Internet.NS, lossRules6(loss))
	}
	return nil
}

// Namespaces returns the names of the lab's namespaces.
func (l *Lab) Namespaces() []string { return slices.Clone(l.namespaces) }

// Describe writes the topology for people.
func (l *Lab) Describe(w io.Writer) {
	fmt.Fprintf(w, "kernel NAT lab %s\n", l.ID)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  internet\t%s\tgateway %s\n", l.Internet.NS, internetGW)
	fmt.Fprintf(tw, "  server\t%s\t%s and %s", l.Server.NS, l.Server.IPs[0], l.Server.IPs[1])
	if len(l.Server.IPv6) == 2 {
		fmt.Fprintf(tw, ", %s and %s", l.Server.IPv6[0], l.Server.IPv6[1])
	}
	fmt.Fprintln(tw)
	for _, s := range l.Sites {
		link := s.Link()
		fmt.Fprintf(tw, "site %s (%s)\tpublic %s\tclaims %s", s.Name, s.Kind, s.PublicIP, ClaimString(s.Claim()))
		if link.Loss > 0 || link.Delay > 0 {
			fmt.Fprintf(tw, ", link loss %d%% delay %v", link.Loss, link.Delay)
		}
		fmt.Fprintln(tw)
		for i := len(s.Routers) - 1; i >= 0; i-- {
			r := s.Routers[i]
			fmt.Fprintf(tw, "  %s\t%s\twan %s\n", r.Name, r.NS, r.IP())
		}
		if s.Subscriber != nil {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", s.Subscriber.Name, s.Subscriber.NS, s.Subscriber.IP())
		}
		for _, h := range s.Hosts {
			fmt.Fprintf(tw, "  %s\t%s\t%s", h.Name, h.NS, h.IP())
			for _, a := range h.IPv6 {
				fmt.Fprintf(tw, " %s", a)
			}
			fmt.Fprintln(tw)
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "run a command inside: ip netns exec <netns> <command>\n")
}

// Close tears the lab down: it stops delay relays, closes every socket the hosts opened,
// kills processes left in the namespaces, deletes the namespaces (with them go their
// veths and nft tables) and checks that nothing with the run ID remains. It is safe to
// call more than once and from any goroutine.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		l.mu.Lock()
		delays := l.delays
		l.delays = nil
		l.mu.Unlock()
		for _, d := range delays {
			d.Close()
		}
		l.closeTracked()
		var errs []error
		for i := len(l.namespaces) - 1; i >= 0; i-- {
			if err := removeNamespace(ctx, l.namespaces[i]); err != nil {
				errs = append(errs, err)
			}
		}
		if l.ID != "" {
			if left := leftovers(NamePrefix + l.ID + "-"); len(left) > 0 {
				errs = append(errs, fmt.Errorf("%w: %s", ErrLeftovers, strings.Join(left, ", ")))
			}
		}
		if l.lockFile != nil {
			os.Remove(l.lockFile.Name())
			l.lockFile.Close()
		}
		if len(errs) == 0 {
			l.log.Info("lab torn down", "run", l.ID)
		}
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}

// removeNamespace kills what runs inside ns, then deletes it.
func removeNamespace(ctx context.Context, ns string) error {
	if out, err := exec.CommandContext(ctx, "ip", "netns", "pids", ns).Output(); err == nil {
		for _, f := range strings.Fields(string(out)) {
			var pid int
			if _, err := fmt.Sscan(f, &pid); err == nil && pid > 1 && pid != os.Getpid() {
				unix.Kill(pid, unix.SIGKILL)
			}
		}
	}
	err := run(ctx, "", "ip", "netns", "del", ns)
	if err != nil {
		if _, serr := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(serr, os.ErrNotExist) {
			return nil
		}
	}
	return err
}

// listNamespaces returns the named namespaces starting with prefix.
func listNamespaces(prefix string) ([]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// rootLinks returns the root namespace's links whose name starts with prefix. The lab
// creates none there, but a crashed older run or a manual experiment might have.
func rootLinks(prefix string) []string {
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		return nil
	}
	var links []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if strings.HasPrefix(name, prefix) {
			links = append(links, name)
		}
	}
	return links
}

// leftovers lists namespaces and root links starting with prefix.
func leftovers(prefix string) []string {
	ns, _ := listNamespaces(prefix)
	var out []string
	for _, n := range ns {
		out = append(out, "netns "+n)
	}
	for _, n := range rootLinks(prefix) {
		out = append(out, "link "+n)
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
