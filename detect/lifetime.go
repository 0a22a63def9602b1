package detect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"peerlink/nat"
	"peerlink/stun"
)

// LifetimeOptions configure MeasureBindingLifetime. Zero fields take the defaults.
type LifetimeOptions struct {
	// Observer is the STUN server to use ("host:port"); it must support RESPONSE-PORT
	// (RFC 5780). Empty means the first configured observer.
	Observer string
	// Start is the shortest idle gap tried (default 10 s); gaps double up to Max
	// (default 320 s).
	Start, Max time.Duration
	// Resolution is when bisection stops (default Start/4).
	Resolution time.Duration
}

// ErrNoLifetime means no probe came back even after the shortest gap: the observer
// ignores RESPONSE-PORT, or the NAT's filter refuses its answers.
var ErrNoLifetime = errors.New("detect: binding lifetime not measurable")

// MeasureBindingLifetime measures how long an idle NAT mapping survives, RFC 5780
// section 4.6 style: a fresh socket opens a mapping with a Binding request; after an
// idle gap a second socket asks the server (RESPONSE-PORT) to answer to that mapping;
// the answer arrives only if the mapping is still there. Gaps of Start, 2·Start, … Max
// run in parallel, then the interval between the last survivor and the first expiry is
// bisected. It takes a little over twice Max, so it is meant for occasional use. The
// result also goes into the cached profile. A NAT that keeps mappings longer than Max
// reports Max.
func (d *Detector) MeasureBindingLifetime(ctx context.Context, opts LifetimeOptions) (time.Duration, error) {
	if opts.Start <= 0 {
		opts.Start = 10 * time.Second
	}
	if opts.Max < opts.Start {
		opts.Max = max(320*time.Second, opts.Start)
	}
	if opts.Resolution <= 0 {
		opts.Resolution = opts.Start / 4
	}
	name := opts.Observer
	if name == "" {
		if len(d.cfg.Observers) == 0 {
			return 0, ErrNoObservers
		}
		name = d.cfg.Observers[0]
	}
	srv, err := resolve(ctx, d.network, name)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrNoObservers, err)
	}
	var gaps []time.Duration
	for g := opts.Start; g <= opts.Max; g *= 2 {
		gaps = append(gaps, g)
	}
	alive, err := d.lifetimeRound(ctx, srv, gaps)
	if err != nil {
		return 0, err
	}
	lo, hi := time.Duration(0), time.Duration(0)
	for i, g := range gaps {
		if alive[i] {
			lo = g
		} else if hi == 0 {
			hi = g
		}
	}
	switch {
	case lo == 0:
		return 0, fmt.Errorf("%w: nothing came back after %v from %v", ErrNoLifetime, opts.Start, srv)
	case hi == 0 || hi < lo:
		return d.storeLifetime(lo), nil
	}
	for hi-lo > opts.Resolution {
		// Three points in between per round: each round takes about hi, so this
		// converges in a couple of rounds.
		step := (hi - lo) / 4
		mid := []time.Duration{lo + step, lo + 2*step, lo + 3*step}
		ok, err := d.lifetimeRound(ctx, srv, mid)
		if err != nil {
			return 0, err
		}
		nlo, nhi := lo, hi
		for i, g := range mid {
			if ok[i] {
				nlo = g
			} else {
				nhi = min(nhi, g)
				break
			}
		}
		lo, hi = nlo, nhi
	}
	return d.storeLifetime(lo), nil
}

func (d *Detector) storeLifetime(l time.Duration) time.Duration {
	if p := d.profile.Load(); p != nil {
		q := *p
		q.BindingLifetime = nat.Duration(l)
		d.profile.CompareAndSwap(p, &q)
	}
	return l
}

// lifetimeRound runs one trial per gap in parallel and reports which mappings survived.
func (d *Detector) lifetimeRound(ctx context.Context, srv netip.AddrPort, gaps []time.Duration) ([]bool, error) {
	alive := make([]bool, len(gaps))
	errs := make([]error, len(gaps))
	var wg sync.WaitGroup
	for i, gap := range gaps {
		wg.Go(func() { alive[i], errs[i] = d.lifetimeTrial(ctx, srv, gap) })
	}
	wg.Wait()
	return alive, errors.Join(errs...)
}

// lifetimeTrial opens a mapping, leaves it idle for gap, and reports whether an answer
// sent to it then still arrives.
func (d *Detector) lifetimeTrial(ctx context.Context, srv netip.AddrPort, gap time.Duration) (bool, error) {
	open := func() (*prober, error) {
		conn, err := d.net.ListenPacket(ctx, d.network, d.bind)
		if err != nil {
			return nil, fmt.Errorf("detect: open probe socket: %w", err)
		}
		return newProber(d.clock, conn), nil
	}
	x, err := open()
	if err != nil {
		return false, err
	}
	defer x.close()
	y, err := open()
	if err != nil {
		return false, err
	}
	defer y.close()

	first, err := x.roundTrip(ctx, srv, 0, d.rto)
	if err != nil {
		return false, fmt.Errorf("detect: opening the mapping: %w", err)
	}
	if err := sleep(ctx, d, gap); err != nil {
		return false, err
	}
	// Ask for the answer on x's mapping, a few times over about a second so a lost
	// packet does not read as an expired mapping.
	id := stun.NewTransactionID()
	got := x.expect(id)
	defer x.forget(id)
	req := stun.AppendBindingRequest(nil, id, stun.RequestOptions{ResponsePort: first.mapped.Port()})
	for range 4 {
		if _, err := y.conn.WriteTo(req, net.UDPAddrFromAddrPort(srv)); err != nil {
			return false, err
		}
		select {
		case r := <-got:
			return r.err == nil && r.a.code == 0, nil
		case <-ctx.Done():
			return false, ctx.Err()
		case <-after(d, 250*time.Millisecond):
		}
	}
	return false, nil
}

// expect registers a transaction this socket did not send (the answer to another
// socket's RESPONSE-PORT request) and returns where its answer will be delivered.
func (p *prober) expect(id stun.TransactionID) chan answerOrErr {
	ch := make(chan answerOrErr, 1)
	p.mu.Lock()
	p.pending[id] = ch
	p.mu.Unlock()
	return ch
}

func (p *prober) forget(id stun.TransactionID) {
	p.mu.Lock()
	delete(p.pending, id)
	p.mu.Unlock()
}

func after(d *Detector, wait time.Duration) <-chan struct{} {
	ch := make(chan struct{})
	d.clock.AfterFunc(wait, func() { close(ch) })
	return ch
}

func sleep(ctx context.Context, d *Detector, wait time.Duration) error {
	select {
	case <-after(d, wait):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-d.ctx.Done():
		return ErrClosed
	}
}
