// Package portmap asks the local router to forward a UDP port to this host, with PCP,
// NAT-PMP or UPnP IGD, and keeps the mapping alive until it is closed.
package portmap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"peerlink/clock"
	"peerlink/nettype"
)

// Protocol is a port mapping protocol.
type Protocol int

// Protocols, in the order Map tries them by default.
const (
	// PCP is the Port Control Protocol, RFC 6887 (MAP opcode, version 2).
	PCP Protocol = iota + 1
	// NATPMP is NAT Port Mapping Protocol, RFC 6886.
	NATPMP
	// UPnP is UPnP IGD v1 or v2 with the WANIPConnection service.
	UPnP
)

func (p Protocol) String() string {
	switch p {
	case PCP:
		return "pcp"
	case NATPMP:
		return "nat-pmp"
	case UPnP:
		return "upnp"
	}
	return fmt.Sprintf("protocol(%d)", int(p))
}

// Errors. Every error Map and the protocol clients return wraps one of these, so callers
// can tell "this router cannot do it" from "this router said no".
var (
	// ErrNoGateway: no gateway was given and none could be found in the routing table.
	ErrNoGateway = errors.New("portmap: no default gateway")
	// ErrNotSupported: the gateway does not speak the protocol (no answer, an unsupported
	// version or opcode, or no UPnP internet gateway device found).
	ErrNotSupported = errors.New("portmap: protocol not supported by gateway")
	// ErrRefused: the gateway speaks the protocol but refused the request.
	ErrRefused = errors.New("portmap: gateway refused")
	// ErrMalformed: a gateway's answer could not be parsed.
	ErrMalformed = errors.New("portmap: malformed response")
	// ErrClosed: the mapping was closed.
	ErrClosed = errors.New("portmap: mapping closed")
)

// Dialer opens stream connections (UPnP control) and connected UDP sockets, which tell
// the address the host uses towards the gateway. netlab hosts and *net.Dialer fit.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Config configures Map.
//
// The zero value maps with the first of PCP, NAT-PMP and UPnP the default gateway
// answers, for two hours, renewed until Close, on the host's real network.
type Config struct {
	// Gateway is the router to ask. The zero Addr means the default IPv4 gateway from
	// /proc/net/route; UPnP then also accepts a device found by SSDP elsewhere on the LAN.
	Gateway netip.Addr
	// Protocols are tried in order until one maps the port. Empty means PCP, NAT-PMP,
	// UPnP: PCP and NAT-PMP cost one small datagram each, UPnP a discovery round and HTTP.
	Protocols []Protocol
	// Lifetime is the lifetime asked for. Zero means two hours, which RFC 6886
	// recommends; gateways may grant less, and the mapping renews at half what was
	// granted.
	Lifetime time.Duration
	// Timeout bounds how long one protocol waits for the gateway's first answer before
	// it is judged unsupported and the next is tried. Zero means 3 s. Requests are
	// retransmitted as RFC 6886 says, starting at 250 ms and doubling.
	Timeout time.Duration
	// Description labels UPnP mappings in the router's list. Empty means "peerlink".
	Description string
	// UPnPMaxVersion limits the IGD WANIPConnection version used: 1 uses only IGDv1
	// actions even on an IGDv2 device. Zero means 2 (AddAnyPortMapping where offered).
	UPnPMaxVersion int
	// SSDPAddr is where UPnP discovery is sent. The zero value means the SSDP
	// multicast group 239.255.255.250:1900, plus the gateway's port 1900 directly.
	SSDPAddr netip.AddrPort
	// Net opens the UDP sockets for PCP, NAT-PMP and SSDP; nil means the host's network.
	Net nettype.PacketListener
	// Dialer opens UPnP control connections and finds the host's own address towards
	// the gateway; nil means a plain net.Dialer.
	Dialer Dialer
	// Clock schedules renewals; nil means the real clock.
	Clock clock.Clock
	// Logger receives progress and renewal failures; nil means quiet.
	Logger *slog.Logger
}

const (
	defaultLifetime    = 2 * time.Hour
	defaultTimeout     = 3 * time.Second
	defaultDescription = "peerlink"
	// initialRTO is RFC 6886's first retransmission interval, doubled on each try.
	initialRTO = 250 * time.Millisecond
	// minRenew keeps a gateway that grants tiny lifetimes from being hammered.
	minRenew = 2 * time.Second
	// closeTimeout bounds the delete request Close sends.
	closeTimeout = 5 * time.Second
)

// cfg is Config with defaults filled in.
type cfg struct {
	Config
	net    nettype.PacketListener
	dialer Dialer
	clock  clock.Clock
	log    *slog.Logger
}

func (c Config) withDefaults() cfg {
	out := cfg{Config: c}
	if len(out.Protocols) == 0 {
		out.Protocols = []Protocol{PCP, NATPMP, UPnP}
	}
	if out.Lifetime <= 0 {
		out.Lifetime = defaultLifetime
	}
	if out.Timeout <= 0 {
		out.Timeout = defaultTimeout
	}
	if out.Description == "" {
		out.Description = defaultDescription
	}
	if out.UPnPMaxVersion <= 0 || out.UPnPMaxVersion > 2 {
		out.UPnPMaxVersion = 2
	}
	out.net = nettype.Or(c.Net)
	out.dialer = c.Dialer
	if out.dialer == nil {
		out.dialer = &net.Dialer{}
	}
	out.clock = clock.Or(c.Clock)
	out.log = c.Logger
	if out.log == nil {
		out.log = slog.New(slog.DiscardHandler)
	}
	return out
}

// grant is what a gateway answered to a map or renew request.
type grant struct {
	external netip.AddrPort
	lifetime time.Duration // zero: permanent (UPnP routers that allow no leases)
}

// client is one protocol's conversation with one gateway about one internal port.
type client interface {
	// mapPort asks for (or renews) the mapping; prev is the current grant on renewals.
	mapPort(ctx context.Context, prev *grant) (grant, error)
	// unmap deletes the mapping.
	unmap(ctx context.Context) error
	// describe names the protocol variant for logs, such as "upnp WANIPConnection:2".
	describe() string
}

// Mapping is a port mapping on the gateway. A goroutine owned by the Mapping renews it
// before it expires; Close stops that and deletes the mapping.
type Mapping struct {
	proto    Protocol
	gateway  netip.Addr
	internal uint16
	c        client
	cfg      cfg

	mu       sync.Mutex
	g        grant
	expires  time.Time
	renewErr error
	timer    clock.Timer

	wake      chan struct{}
	ctx       context.Context
	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// Map asks the gateway to forward UDP traffic arriving at some external port to
// internalPort on this host, trying cfg.Protocols in order. The mapping is kept until
// Close. When every protocol fails the error joins each one's error.
func Map(ctx context.Context, config Config, internalPort uint16) (*Mapping, error) {
	if internalPort == 0 {
		return nil, errors.New("portmap: internal port 0")
	}
	c := config.withDefaults()
	gw := c.Gateway
	if !gw.IsValid() {
		var err error
		if gw, err = DefaultGateway(); err != nil {
			return nil, err
		}
	}
	var errs []error
	for _, p := range c.Protocols {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		cl, err := newClient(ctx, c, p, gw, internalPort)
		if err == nil {
			var g grant
			g, err = cl.mapPort(ctx, nil)
			if err == nil {
				c.log.Info("port mapped", "protocol", cl.describe(), "gateway", gw, "internal", internalPort, "external", g.external, "lifetime", g.lifetime)
				return newMapping(c, p, gw, internalPort, cl, g), nil
			}
		}
		c.log.Debug("port mapping protocol failed", "protocol", p, "gateway", gw, "err", err)
		errs = append(errs, fmt.Errorf("%v: %w", p, err))
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("%w: no protocols", ErrNotSupported)
	}
	return nil, errors.Join(errs...)
}

func newClient(ctx context.Context, c cfg, p Protocol, gw netip.Addr, port uint16) (client, error) {
	switch p {
	case PCP:
		local, err := localAddr(ctx, c.dialer, gw)
		if err != nil {
			return nil, err
		}
		return newPCPClient(c, gw, local, port), nil
	case NATPMP:
		return &natpmpClient{cfg: c, gateway: gw, internal: port}, nil
	case UPnP:
		return discoverUPnP(ctx, c, gw, port)
	}
	return nil, fmt.Errorf("%w: unknown protocol %d", ErrNotSupported, int(p))
}

// localAddr is the host's address on the way to gw. Connecting a UDP socket sends
// nothing; it only asks the kernel for the route.
func localAddr(ctx context.Context, d Dialer, gw netip.Addr) (netip.Addr, error) {
	conn, err := d.DialContext(ctx, "udp4", netip.AddrPortFrom(gw, natpmpPort).String())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("portmap: finding own address towards %v: %w", gw, err)
	}
	defer conn.Close()
	ap, err := netip.ParseAddrPort(conn.LocalAddr().String())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("portmap: own address: %w", err)
	}
	return ap.Addr().Unmap(), nil
}

func newMapping(c cfg, p Protocol, gw netip.Addr, port uint16, cl client, g grant) *Mapping {
	ctx, cancel := context.WithCancel(context.Background())
	m := &Mapping{
		proto: p, gateway: gw, internal: port, c: cl, cfg: c,
		g:    g,
		wake: make(chan struct{}, 1), ctx: ctx, cancel: cancel, done: make(chan struct{}),
	}
	m.mu.Lock()
	m.scheduleLocked(renewAfter(g.lifetime))
	m.mu.Unlock()
	go m.run()
	return m
}

// renewAfter is when to renew a grant: at half its lifetime, as RFC 6886 and RFC 6887
// advise, so one lost renewal still leaves time for another. Zero means never.
func renewAfter(lifetime time.Duration) time.Duration {
	if lifetime <= 0 {
		return 0
	}
	return max(lifetime/2, minRenew)
}

// scheduleLocked arms the renewal timer; d of zero arms nothing.
func (m *Mapping) scheduleLocked(d time.Duration) {
	if m.timer != nil {
		m.timer.Stop()
		m.timer = nil
	}
	if m.g.lifetime > 0 {
		m.expires = m.cfg.clock.Now().Add(m.g.lifetime)
	} else {
		m.expires = time.Time{}
	}
	if d <= 0 {
		return
	}
	m.timer = m.cfg.clock.AfterFunc(d, func() {
		select {
		case m.wake <- struct{}{}:
		default:
		}
	})
}

// run renews the mapping whenever the timer fires, until Close.
func (m *Mapping) run() {
	defer close(m.done)
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.wake:
		}
		m.renew()
	}
}

func (m *Mapping) renew() {
	m.mu.Lock()
	prev := m.g
	expires := m.expires
	m.mu.Unlock()
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.Timeout*4)
	g, err := m.c.mapPort(ctx, &prev)
	cancel()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ctx.Err() != nil {
		return
	}
	if err != nil {
		m.renewErr = err
		// Retry well before the old grant runs out: a quarter of what is left.
		left := expires.Sub(m.cfg.clock.Now())
		retry := max(left/4, minRenew)
		m.cfg.log.Warn("port mapping renewal failed", "protocol", m.c.describe(), "external", prev.external, "left", left, "retry", retry, "err", err)
		if m.timer != nil {
			m.timer.Stop()
		}
		m.timer = m.cfg.clock.AfterFunc(retry, func() {
			select {
			case m.wake <- struct{}{}:
			default:
			}
		})
		return
	}
	m.renewErr = nil
	if g.external != prev.external {
		m.cfg.log.Info("port mapping moved", "protocol", m.c.describe(), "old", prev.external, "new", g.external)
	} else {
		m.cfg.log.Debug("port mapping renewed", "protocol", m.c.describe(), "external", g.external, "lifetime", g.lifetime)
	}
	m.g = g
	m.scheduleLocked(renewAfter(g.lifetime))
}

// External is the address and port the internet reaches the mapping at. It can change
// when a renewal is answered with another port or address.
func (m *Mapping) External() netip.AddrPort {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.g.external
}

// Protocol is the protocol that made the mapping.
func (m *Mapping) Protocol() Protocol { return m.proto }

// Gateway is the router that holds the mapping.
func (m *Mapping) Gateway() netip.Addr { return m.gateway }

// InternalPort is the host's port the mapping forwards to.
func (m *Mapping) InternalPort() uint16 { return m.internal }

// Expires is when the mapping lapses unless renewed; the zero Time for a permanent one.
func (m *Mapping) Expires() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.expires
}

// Err is the last renewal's error, nil after a successful one.
func (m *Mapping) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.renewErr
}

// Close stops renewing, waits for a renewal in flight and deletes the mapping on the
// gateway. It is safe to call more than once; later calls return the first's result.
func (m *Mapping) Close() error {
	m.closeOnce.Do(func() {
		m.cancel()
		m.mu.Lock()
		if m.timer != nil {
			m.timer.Stop()
			m.timer = nil
		}
		m.mu.Unlock()
		<-m.done
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		if err := m.c.unmap(ctx); err != nil {
			m.closeErr = fmt.Errorf("portmap: deleting %v mapping %v: %w", m.proto, m.External(), err)
			return
		}
		m.cfg.log.Info("port mapping deleted", "protocol", m.c.describe(), "external", m.External())
	})
	return m.closeErr
}
