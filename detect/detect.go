// Package detect profiles the local NAT (mapping, filtering, allocation, public address,
// hairpinning) with STUN behaviour discovery against one or more observers.
package detect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/clock"
	"peerlink/nat"
	"peerlink/nettype"
)

// Errors. Detection errors wrap one of these with their cause.
var (
	// ErrNotDetected: LocalProfile was called before any detection finished.
	ErrNotDetected = errors.New("detect: NAT not detected yet")
	// ErrDetectionTimeout: the observers did not answer enough within the timeout.
	ErrDetectionTimeout = errors.New("detect: detection timed out")
	// ErrNoObservers: no STUN observer was configured, or none could be resolved.
	ErrNoObservers = errors.New("detect: no observers")
	// ErrClosed: the detector was closed.
	ErrClosed = errors.New("detect: detector closed")
)

// DefaultTimeout bounds a detection when Options.Timeout is zero.
const DefaultTimeout = 5 * time.Second

// Config configures a Detector. The zero value probes nothing (no observers) on the
// host's real network.
type Config struct {
	// Observers are STUN servers as "host:port". Put an RFC 5780 server (two IPs) first:
	// filtering and the precise mapping tests need one. Further single-IP observers
	// cross-check the mapping and raise confidence.
	Observers []string
	// Net opens the probe sockets; nil means the host's network.
	Net nettype.PacketListener
	// Network is "udp4" (default) or "udp6".
	Network string
	// Bind is the local address probe sockets bind to; empty means any address, port 0.
	Bind string
	// LocalIPs lists this host's own addresses, to recognise "no NAT" (the reflexive
	// address is a local one). Nil means the host's interface addresses.
	LocalIPs func() ([]netip.Addr, error)
	// RTO is the first retransmission interval; zero means 100 ms, which suits a
	// detection budget of a few round trips (it grows by half each time).
	RTO time.Duration
	// Clock is the time source; nil means the real clock.
	Clock clock.Clock
	// Logger receives debug logs; nil means quiet.
	Logger *slog.Logger
}

// Options are per-call options for Detect.
type Options struct {
	// Force runs a fresh detection even when a profile is cached.
	Force bool
	// Timeout bounds the detection; zero means DefaultTimeout.
	Timeout time.Duration
	// Observers overrides Config.Observers for this call.
	Observers []string
}

// Change is delivered to subscribers when the profile changes.
type Change struct {
	Old, New nat.Profile
}

// Detector profiles the local NAT and caches the result. It is safe for concurrent use.
type Detector struct {
	net      nettype.PacketListener
	network  string
	bind     string
	clock    clock.Clock
	rto      time.Duration
	log      *slog.Logger
	cfg      Config
	localIPs func() ([]netip.Addr, error)

	profile atomic.Pointer[nat.Profile]
	report  atomic.Pointer[Report]

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu         sync.Mutex
	inflight   *flight
	subs       map[int]chan Change
	nextSub    int
	refreshing bool
	obs        []netip.AddrPort // recent peer observations of our reflexive address
	closed     bool
}

type flight struct {
	done   chan struct{}
	report Report
	err    error
}

// New returns a Detector. It does no I/O until Detect or Refresh.
func New(cfg Config) *Detector {
	d := &Detector{
		net:      nettype.Or(cfg.Net),
		network:  cfg.Network,
		bind:     cfg.Bind,
		clock:    clock.Or(cfg.Clock),
		rto:      cfg.RTO,
		log:      cfg.Logger,
		cfg:      cfg,
		localIPs: cfg.LocalIPs,
		subs:     make(map[int]chan Change),
	}
	if d.network == "" {
		d.network = "udp4"
	}
	if d.bind == "" {
		d.bind = ":0"
	}
	if d.rto <= 0 {
		d.rto = 100 * time.Millisecond
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	if d.localIPs == nil {
		d.localIPs = interfaceIPs
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d
}

// Detect returns the cached profile, or runs a detection when nothing is cached or
// opts.Force is set. Concurrent calls share one detection.
//
// When no observer answers at all, the error wraps ErrDetectionTimeout and the returned
// profile has UDPBlocked set: the network may drop UDP, and only relays over TCP or TLS
// will work. Such a profile is not cached.
func (d *Detector) Detect(ctx context.Context, opts Options) (nat.Profile, error) {
	if !opts.Force {
		if p := d.profile.Load(); p != nil {
			return *p, nil
		}
	}
	r, err := d.DetectReport(ctx, opts)
	return r.Profile, err
}

// DetectReport always runs a fresh detection (sharing one already in flight) and
// returns its full report: each observer's answer and latency, and the duration.
func (d *Detector) DetectReport(ctx context.Context, opts Options) (Report, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return Report{}, ErrClosed
	}
	f := d.inflight
	if f == nil {
		f = &flight{done: make(chan struct{})}
		d.inflight = f
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			// The detection belongs to the detector, not to the first caller: a caller
			// that gives up does not spoil it for the others. Its timeout bounds it.
			f.report, f.err = d.detect(d.ctx, opts)
			d.mu.Lock()
			d.inflight = nil
			d.mu.Unlock()
			close(f.done)
		}()
	}
	d.mu.Unlock()
	select {
	case <-f.done:
		return f.report, f.err
	case <-ctx.Done():
		return Report{}, fmt.Errorf("%w: %w", ErrDetectionTimeout, ctx.Err())
	}
}

func (d *Detector) detect(ctx context.Context, opts Options) (Report, error) {
	names := opts.Observers
	if len(names) == 0 {
		names = d.cfg.Observers
	}
	if len(names) == 0 {
		return Report{}, ErrNoObservers
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	var observers []netip.AddrPort
	var resolveErrs []error
	for _, n := range names {
		ap, err := resolve(ctx, d.network, n)
		if err != nil {
			resolveErrs = append(resolveErrs, err)
			continue
		}
		observers = append(observers, ap)
	}
	if len(observers) == 0 {
		return Report{}, fmt.Errorf("%w: %w", ErrNoObservers, errors.Join(resolveErrs...))
	}
	local, err := d.localIPs()
	if err != nil {
		d.log.Debug("detect: listing local addresses", "err", err)
	}
	r := &run{d: d, observers: observers, localIPs: local}
	rep, err := r.detect(ctx, timeout)
	if err != nil {
		d.log.Debug("detect: detection failed", "err", err)
		return rep, err
	}
	d.log.Debug("detect: profile", "profile", rep.Profile.String(), "took", rep.Duration)
	d.report.Store(&rep)
	d.store(rep.Profile)
	return rep, nil
}

// store caches p and tells subscribers when it differs from the previous profile in
// anything but its timestamp and confidence.
func (d *Detector) store(p nat.Profile) {
	old := d.profile.Swap(&p)
	if old != nil && sameNAT(*old, p) {
		return
	}
	var prev nat.Profile
	if old != nil {
		prev = *old
	}
	d.mu.Lock()
	d.obs = nil
	for _, ch := range d.subs {
		select {
		case ch <- Change{Old: prev, New: p}:
		default: // a subscriber that does not keep up misses intermediate changes
		}
	}
	d.mu.Unlock()
}

func sameNAT(a, b nat.Profile) bool {
	a.DetectedAt, b.DetectedAt = time.Time{}, time.Time{}
	a.Confidence, b.Confidence = 0, 0
	return a == b
}

// LocalProfile returns the cached profile without any network I/O, or ErrNotDetected.
func (d *Detector) LocalProfile() (nat.Profile, error) {
	if p := d.profile.Load(); p != nil {
		return *p, nil
	}
	return nat.Profile{}, ErrNotDetected
}

// LastReport returns the report of the last successful detection, if any.
func (d *Detector) LastReport() (Report, bool) {
	if r := d.report.Load(); r != nil {
		return *r, true
	}
	return Report{}, false
}

// Subscribe returns a channel that receives a Change each time the profile changes,
// and a function that ends the subscription. The channel holds a few changes; a slow
// reader misses intermediate ones, never the latest state (LocalProfile has it).
func (d *Detector) Subscribe() (<-chan Change, func()) {
	ch := make(chan Change, 4)
	d.mu.Lock()
	id := d.nextSub
	d.nextSub++
	d.subs[id] = ch
	d.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			d.mu.Lock()
			delete(d.subs, id)
			d.mu.Unlock()
		})
	}
}

// Refresh starts a fresh detection in the background (after a network change, say)
// unless one is already running. Subscribers hear of the result if it differs.
func (d *Detector) Refresh() {
	d.mu.Lock()
	if d.closed || d.refreshing {
		d.mu.Unlock()
		return
	}
	d.refreshing = true
	d.wg.Add(1)
	d.mu.Unlock()
	go func() {
		defer d.wg.Done()
		_, err := d.DetectReport(d.ctx, Options{Force: true})
		if err != nil {
			d.log.Debug("detect: background refresh failed", "err", err)
		}
		d.mu.Lock()
		d.refreshing = false
		d.mu.Unlock()
	}()
}

// observationsToRefresh is how many peer reports that contradict the cached public
// address make the detector re-detect: one could be a peer that lies or is confused.
const observationsToRefresh = 2

// AddObservation takes the reflexive address a peer reports seeing for this node.
// Reports that contradict the cached profile (another public IP, or another port while
// the mapping is believed endpoint-independent) lower its confidence and, once two
// peers agree on a contradiction, trigger a background re-detection.
func (d *Detector) AddObservation(addr netip.AddrPort) {
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	p := d.profile.Load()
	if p == nil || !addr.IsValid() {
		return
	}
	contradicts := addr.Addr() != p.PublicIP ||
		(p.Mapping == nat.MappingEI && addr.Port() != p.PublicPort)
	if !contradicts {
		return
	}
	d.mu.Lock()
	d.obs = append(d.obs, addr)
	if len(d.obs) > 16 {
		d.obs = d.obs[len(d.obs)-16:]
	}
	n := len(d.obs)
	d.mu.Unlock()
	if p.Confidence != nat.ConfidenceLow {
		q := *p
		q.Confidence = nat.ConfidenceLow
		d.profile.CompareAndSwap(p, &q)
	}
	if n >= observationsToRefresh {
		d.Refresh()
	}
}

// Close stops background work and waits for it. It is idempotent.
func (d *Detector) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	d.cancel()
	d.wg.Wait()
	return nil
}

func resolve(ctx context.Context, network, hostport string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(hostport); err == nil {
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("observer %q: %w", hostport, err)
	}
	pn, err := net.DefaultResolver.LookupPort(ctx, "udp", port)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("observer %q: %w", hostport, err)
	}
	ipnet := "ip4"
	if network == "udp6" {
		ipnet = "ip6"
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, ipnet, host)
	if err != nil || len(ips) == 0 {
		return netip.AddrPort{}, fmt.Errorf("observer %q: cannot resolve: %v", hostport, err)
	}
	return netip.AddrPortFrom(ips[0].Unmap(), uint16(pn)), nil
}

func interfaceIPs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range addrs {
		if pfx, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, pfx.Addr().Unmap())
		}
	}
	return out, nil
}
