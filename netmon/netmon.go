// Package netmon tells a node when the host's network changed: an interface came or
// went, an address was added or removed, the routes moved.
package netmon

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Config configures a Monitor. The zero value watches the host with netlink on Linux
// and by polling elsewhere.
type Config struct {
	// Poll is the polling interval when netlink is not used; zero means 5 s.
	Poll time.Duration
	// Debounce is how long the monitor waits after a change for more before it
	// reports: a network that comes up adds a link, addresses and routes in a burst.
	// Zero means 250 ms.
	Debounce time.Duration
	// ForcePoll polls even where netlink is available (tests, and kernels that deny
	// netlink sockets).
	ForcePoll bool
	// Addrs lists the host's interface addresses for polling; nil means the addresses
	// of the interfaces that are up, from the net package.
	Addrs func() ([]netip.Prefix, error)
	// Logger receives what the monitor sees; nil means quiet.
	Logger *slog.Logger
}

func (c Config) poll() time.Duration {
	if c.Poll <= 0 {
		return 5 * time.Second
	}
	return c.Poll
}

func (c Config) debounce() time.Duration {
	if c.Debounce <= 0 {
		return 250 * time.Millisecond
	}
	return c.Debounce
}

// Monitor watches the network until Close.
type Monitor struct {
	cfg     Config
	log     *slog.Logger
	changes chan struct{}
	raw     chan struct{}
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	src     source
	once    sync.Once
}

// source is where raw change events come from: netlink or polling.
type source interface {
	run(ctx context.Context, raw chan<- struct{})
	close() error
}

// New starts a monitor. On Linux it opens a netlink socket in the calling thread's
// network namespace, so a caller that runs it inside a namespace watches that one.
func New(cfg Config) (*Monitor, error) {
	m := &Monitor{cfg: cfg, log: cfg.Logger, changes: make(chan struct{}, 1), raw: make(chan struct{}, 1)}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	var err error
	if !cfg.ForcePoll {
		m.src, err = openNetlink()
		if err != nil {
			m.log.Debug("netmon: netlink unavailable, polling", "err", err)
		}
	}
	if m.src == nil {
		addrs := cfg.Addrs
		if addrs == nil {
			addrs = hostAddrs
		}
		p := &poller{every: cfg.poll(), addrs: addrs}
		if p.last, err = addrs(); err != nil {
			return nil, err
		}
		m.src = p
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.wg.Go(func() { m.src.run(m.ctx, m.raw) })
	m.wg.Go(m.coalesce)
	return m, nil
}

// Changes delivers one value after each burst of changes. It is never closed; a
// receiver that falls behind sees one value for several bursts.
func (m *Monitor) Changes() <-chan struct{} { return m.changes }

// Close stops the monitor and waits for it.
func (m *Monitor) Close() error {
	var err error
	m.once.Do(func() {
		m.cancel()
		err = m.src.close()
		m.wg.Wait()
	})
	return err
}

// coalesce turns raw events into one report per burst.
func (m *Monitor) coalesce() {
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.raw:
		}
		quiet := time.NewTimer(m.cfg.debounce())
	burst:
		for {
			select {
			case <-m.ctx.Done():
				quiet.Stop()
				return
			case <-m.raw:
				quiet.Reset(m.cfg.debounce())
			case <-quiet.C:
				break burst
			}
		}
		m.log.Debug("netmon: network changed")
		select {
		case m.changes <- struct{}{}:
		default:
		}
	}
}

func signal(raw chan<- struct{}) {
	select {
	case raw <- struct{}{}:
	default:
	}
}

// poller compares the address list at an interval.
type poller struct {
	every time.Duration
	addrs func() ([]netip.Prefix, error)
	last  []netip.Prefix
}

func (p *poller) run(ctx context.Context, raw chan<- struct{}) {
	t := time.NewTicker(p.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now, err := p.addrs()
		if err != nil {
			continue
		}
		if !slices.Equal(now, p.last) {
			p.last = now
			signal(raw)
		}
	}
}

func (p *poller) close() error { return nil }

// hostAddrs lists the addresses of the interfaces that are up, sorted.
func hostAddrs() ([]netip.Prefix, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 {
			continue
		}
		as, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range as {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					ones, _ := n.Mask.Size()
					out = append(out, netip.PrefixFrom(ip.Unmap(), ones))
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return out, nil
}
