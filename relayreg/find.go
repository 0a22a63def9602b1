package relayreg

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"peerlink/identity"
)

// ErrNoRelay is returned by FindRelay when no registered relay is usable.
var ErrNoRelay = errors.New("relayreg: no relay available")

// Source lists registered relays: a Registry on a server, a rendezvous client elsewhere.
type Source interface {
	ListRelays(ctx context.Context) ([]Info, error)
}

// Prober measures the round trip to a relay endpoint.
type Prober interface {
	Probe(ctx context.Context, e Endpoint) (time.Duration, error)
}

// ProberFunc adapts a function to Prober.
type ProberFunc func(ctx context.Context, e Endpoint) (time.Duration, error)

// Probe calls f.
func (f ProberFunc) Probe(ctx context.Context, e Endpoint) (time.Duration, error) { return f(ctx, e) }

// Choice is the relay FindRelay picked.
type Choice struct {
	NodeID   identity.NodeID `json:"node_id"`
	Endpoint Endpoint        `json:"endpoint"`
	// Latency is the measured round trip to Endpoint.
	Latency time.Duration `json:"-"`
	// LatencyMS is Latency in milliseconds, for the JSON form.
	LatencyMS float64 `json:"latency_ms"`
	// Load is the relay's utilisation, 0 to 1.
	Load float64 `json:"load"`
	// Info is the registration the choice came from.
	Info Info `json:"-"`
}

// Finder picks relays. The zero value (with Source set) probes udp endpoints with a STUN
// Binding request and tcp and tls endpoints with a TCP handshake.
//
// Scoring: every relay that is not full is probed (at most Concurrency at a time, each
// within ProbeTimeout) on its most preferred endpoint; relays that do not answer are
// dropped. The cost of a relay is its round trip plus LoadPenalty × utilisation
// (Load/Capacity; a relay that declares no capacity counts as half full), and the lowest
// cost wins; ties go to the less loaded relay. With the default penalty a relay at 80 %
// load must be 40 ms closer than an idle one to win.
type Finder struct {
	Source Source
	// Prober measures endpoints; nil means STUNProber{} with ProbeTimeout.
	Prober Prober
	// Transports are the acceptable transports, most preferred first; nil means udp,
	// tcp, tls. A relay with none of them is skipped.
	Transports []Transport
	// LoadPenalty is the latency a fully loaded relay is charged; zero means 50 ms.
	LoadPenalty time.Duration
	// ProbeTimeout bounds each probe; zero means 1 s.
	ProbeTimeout time.Duration
	// Concurrency caps probes in flight; zero means 8.
	Concurrency int
	// Logger receives probe failures; nil means quiet.
	Logger *slog.Logger
}

var defaultTransports = []Transport{UDP, TCP, TLS}

// pick returns the relay's endpoint on the most preferred acceptable transport.
func (f *Finder) pick(i Info) (Endpoint, bool) {
	ts := f.Transports
	if ts == nil {
		ts = defaultTransports
	}
	for _, t := range ts {
		for _, e := range i.Endpoints {
			if e.Transport == t {
				return e, true
			}
		}
	}
	return Endpoint{}, false
}

// FindRelay returns the best relay for a connection to target. The target itself is
// never chosen (a relay is a third party), and neither is a full relay.
func (f *Finder) FindRelay(ctx context.Context, target identity.NodeID) (Choice, error) {
	relays, err := f.Source.ListRelays(ctx)
	if err != nil {
		return Choice{}, fmt.Errorf("relayreg: list relays: %w", err)
	}
	var cands []Choice
	for _, r := range relays {
		if r.NodeID == target || r.Full() {
			continue
		}
		if e, ok := f.pick(r); ok {
			cands = append(cands, Choice{NodeID: r.NodeID, Endpoint: e, Load: r.Utilisation(), Info: r})
		}
	}
	if len(cands) == 0 {
		return Choice{}, ErrNoRelay
	}
	timeout := cmp.Or(f.ProbeTimeout, time.Second)
	prober := f.Prober
	if prober == nil {
		prober = STUNProber{Timeout: timeout}
	}
	ok := make([]bool, len(cands))
	sem := make(chan struct{}, cmp.Or(f.Concurrency, 8))
	var wg sync.WaitGroup
	for i := range cands {
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			pctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			rtt, err := prober.Probe(pctx, cands[i].Endpoint)
			if err != nil {
				if f.Logger != nil {
					f.Logger.Debug("relay probe failed", "relay", cands[i].NodeID.Short(), "endpoint", cands[i].Endpoint, "err", err)
				}
				return
			}
			cands[i].Latency = rtt
			cands[i].LatencyMS = float64(rtt.Microseconds()) / 1000
			ok[i] = true
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return Choice{}, err
	}
	penalty := cmp.Or(f.LoadPenalty, 50*time.Millisecond)
	cost := func(c Choice) time.Duration { return c.Latency + time.Duration(c.Load*float64(penalty)) }
	var live []Choice
	for i, c := range cands {
		if ok[i] {
			live = append(live, c)
		}
	}
	if len(live) == 0 {
		return Choice{}, fmt.Errorf("%w: none of %d relays answered a probe", ErrNoRelay, len(cands))
	}
	best := slices.MinFunc(live, func(a, b Choice) int {
		return cmp.Or(
			cmp.Compare(cost(a), cost(b)),
			cmp.Compare(a.Load, b.Load),
			cmp.Compare(a.NodeID.String(), b.NodeID.String()),
		)
	})
	return best, nil
}
