package punch

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	pion "github.com/pion/stun/v3"

	"peerlink/clock"
	"peerlink/mux"
	"peerlink/nat"
	"peerlink/stun"
)

// Bounds on what the peer can make an attempt do.
const (
	// maxTriggered bounds the triggered checks of one round: the easy side of birthday
	// probing may hear from every one of the hard side's sockets at once, and needs
	// only one path.
	maxTriggered = 32
	// maxLearned bounds the peer addresses carried from one round to the next.
	maxLearned = MaxBirthdaySockets
)

// pairKey is a candidate path: a local socket and a destination.
type pairKey struct {
	local  *mux.Mux
	remote netip.AddrPort
}

// validation is a check of ours that got a valid response.
type validation struct {
	pair      pairKey
	source    netip.AddrPort // where the response came from: the peer's side of the path
	reflexive netip.AddrPort // where the peer saw our check come from
	rtt       time.Duration
}

// nomination is the initiator's choice of path, as the responder received it.
type nomination struct {
	pair pairKey // the socket it arrived on and its source
	seen netip.AddrPort
}

type counters struct{ checks, probes, heard, answered int }

// Attempt is one side of one hole-punching attempt: the sockets Prepare opened, answers
// to the peer's checks, and Run. It answers the peer's checks from Prepare until Close,
// also after Run has returned: the peer may still need a response to finish. Close it
// once both sides are done, or the attempt is abandoned.
type Attempt struct {
	e          *Engine
	cfg        Config
	session    string
	key        []byte
	self, peer nat.Side
	step       nat.Step
	role       role
	local      nat.Profile
	remote     nat.Profile
	main       *mux.Mux
	fresh      *mux.Mux   // port prediction's fresh socket
	freshConn  *watchConn // its socket, to order its first packets
	hard       []*mux.Mux // birthday sockets
	pred       Prediction

	ctx       context.Context // ends on Close
	cancel    context.CancelCauseFunc
	nominated chan struct{}   // a nomination was accepted
	tried     map[uint16]bool // birthday ports probed; only the probe goroutine uses it

	mu        sync.Mutex
	closed    bool
	ran       bool
	finished  bool        // Run has returned, or is returning
	accepted  *nomination // the responder's path, once the initiator nominated it
	deadline  time.Time   // the end of Run's last attempt
	linger    time.Time   // until when a closed responder still answers its nomination
	cur       *round
	learned   []pairKey // peer addresses heard, to check in later rounds
	known     map[pairKey]bool
	validated map[pairKey]validation
	keep      *mux.Mux // an own socket handed to the caller in a Result
	timers    map[*pendingTimer]struct{}
	stats     counters
	wg        sync.WaitGroup // Run and pending timers
}

type pendingTimer struct{ t clock.Timer }

// Prepare opens what this side's part in s.Step needs before the peers exchange anything
// and returns the Prediction to send to the peer (zero when the step predicts nothing of
// this side). From now until Close the attempt answers the peer's checks.
//
// The side whose ports are predicted opens a fresh socket and, when its NAT maps
// independently of the destination or allocates contiguously, learns that socket's
// mapping from Config.STUNServer. The hard side of birthday probing opens
// Config.BirthdaySockets sockets. A Relay step fails with ErrNotPunchable.
func (e *Engine) Prepare(ctx context.Context, s Setup) (*Attempt, Prediction, error) {
	switch {
	case s.Session == "" || len(s.Session) > maxSession:
		return nil, Prediction{}, fmt.Errorf("%w: session ID of %d bytes, want 1 to %d", ErrBadParams, len(s.Session), maxSession)
	case len(s.Key) < 16:
		return nil, Prediction{}, fmt.Errorf("%w: session key of %d bytes, want at least 16", ErrBadParams, len(s.Key))
	case s.Main == nil:
		return nil, Prediction{}, fmt.Errorf("%w: no main socket", ErrBadParams)
	}
	r, err := roleOf(s.Step, s.Self, s.Local, s.Remote)
	if err != nil {
		return nil, Prediction{}, err
	}
	a := &Attempt{
		e:         e,
		cfg:       e.cfg,
		session:   s.Session,
		key:       slices.Clone(s.Key),
		self:      s.Self,
		peer:      nat.SideA + nat.SideB - s.Self,
		step:      s.Step,
		role:      r,
		local:     s.Local,
		remote:    s.Remote,
		main:      s.Main,
		nominated: make(chan struct{}, 1),
		tried:     map[uint16]bool{},
		known:     map[pairKey]bool{},
		validated: map[pairKey]validation{},
		timers:    map[*pendingTimer]struct{}{},
	}
	a.ctx, a.cancel = context.WithCancelCause(context.Background())
	if err := e.register(a); err != nil {
		return nil, Prediction{}, err
	}
	if err := a.prepare(ctx); err != nil {
		a.Close()
		return nil, Prediction{}, err
	}
	return a, a.pred, nil
}

func (a *Attempt) prepare(ctx context.Context) error {
	switch {
	case a.role.fresh:
		m, err := a.listen(ctx, func(c net.PacketConn) net.PacketConn {
			a.freshConn = &watchConn{PacketConn: c, wait: map[netip.AddrPort]chan struct{}{}}
			return a.freshConn
		})
		if err != nil {
			return err
		}
		a.fresh = m
		var mapped netip.AddrPort
		if needsMapping(a.local) {
			if !a.cfg.STUNServer.IsValid() {
				return fmt.Errorf("%w: %v behind %s needs Config.STUNServer to learn a fresh mapping", ErrBadParams, a.step, a.local.Type())
			}
			bctx, cancel := withTimeout(ctx, a.cfg.Clock, a.cfg.Timeout, ErrTimeout)
			mapped, err = m.Binding(bctx, a.cfg.STUNServer, 2*a.cfg.CheckInterval)
			cancel()
			if err != nil {
				return fmt.Errorf("punch: learning the fresh socket's mapping from %v: %w", a.cfg.STUNServer, err)
			}
		}
		ip := a.local.PublicIP
		if mapped.IsValid() {
			ip = mapped.Addr()
		}
		a.pred = Prediction{IP: ip, Ports: predictPorts(a.local, m.LocalAddr().Port(), mapped, a.cfg.PredictWindow)}
	case a.role.hard:
		for range a.cfg.BirthdaySockets {
			m, err := a.listen(ctx, nil)
			if err != nil {
				return err
			}
			a.hard = append(a.hard, m)
		}
		a.pred = Prediction{IP: a.local.PublicIP, Sockets: len(a.hard)}
	}
	return nil
}

// listen opens a socket of the attempt's own; wrap, if not nil, wraps it.
func (a *Attempt) listen(ctx context.Context, wrap func(net.PacketConn) net.PacketConn) (*mux.Mux, error) {
	network := "udp4"
	if ip := a.local.PublicIP; ip.Is6() && !ip.Is4In6() {
		network = "udp6"
	}
	conn, err := a.cfg.Net.ListenPacket(ctx, network, ":0")
	if err != nil {
		return nil, fmt.Errorf("punch: opening a socket: %w", err)
	}
	if wrap != nil {
		conn = wrap(conn)
	}
	return newMux(conn, mux.Config{Clock: a.cfg.Clock, Logger: a.cfg.Logger}, func(m *mux.Mux, b []byte, from netip.AddrPort) {
		dm, err := decode(b)
		if err != nil {
			return
		}
		if s, _, ok := checkSession(dm); ok && s == a.session {
			a.handle(m, dm, from)
		}
	}), nil
}

// handle answers a check that arrived on m from from: a few responses, then a triggered
// check back to from. It runs on m's read loop and does not block.
func (a *Attempt) handle(m *mux.Mux, dm *pion.Message, from netip.AddrPort) {
	c, err := parseCheck(dm, a.session, a.peer, a.key)
	if err != nil {
		a.e.debug("punch: dropped check", "session", a.session, "from", from, "err", err)
		return
	}
	from = unmap(from)
	k := pairKey{m, from}
	a.mu.Lock()
	if a.closed {
		// A responder closed right after Run still confirms its path: the
		// initiator finishes only on that answer, and the first may have been lost.
		ok := c.nominate && a.accepted != nil && a.accepted.pair == k && a.cfg.Clock.Now().Before(a.linger)
		a.mu.Unlock()
		if ok {
			m.WriteTo(buildResponse(c.id, from, a.key), from)
		}
		return
	}
	a.stats.heard++
	r, finished := a.cur, a.finished
	accepted := false
	if c.nominate && a.self == nat.SideB {
		// The answer to a nomination is what ends the initiator's Run, so answer
		// only the nomination this side takes: the first, while Run is not over.
		if a.accepted == nil && !finished {
			a.accepted = &nomination{pair: k, seen: c.seen}
			accepted = true
		}
		if a.accepted == nil || a.accepted.pair != k {
			a.mu.Unlock()
			a.e.debug("punch: refused nomination", "session", a.session, "from", from)
			return
		}
	}
	a.mu.Unlock()

	resp := buildResponse(c.id, from, a.key)
	m.WriteTo(resp, from)
	for i := 1; i < a.cfg.Acks; i++ {
		a.after(time.Duration(i)*a.cfg.AckSpacing, func() { m.WriteTo(resp, from) })
	}
	switch {
	case accepted:
		a.e.debug("punch: nominated", "session", a.session, "local", m.LocalAddr(), "remote", from)
		select {
		case a.nominated <- struct{}{}:
		default:
		}
	case c.nominate || finished:
	case r != nil:
		r.hit()
		a.trigger(r, k)
	default:
		a.learn(k)
	}
}

// after runs f once d has passed, unless the attempt closes first.
func (a *Attempt) after(d time.Duration, f func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return
	}
	pt := &pendingTimer{}
	a.wg.Add(1)
	pt.t = a.cfg.Clock.AfterFunc(d, func() {
		defer a.wg.Done()
		a.mu.Lock()
		_, live := a.timers[pt]
		delete(a.timers, pt)
		a.mu.Unlock()
		if live {
			f()
		}
	})
	a.timers[pt] = struct{}{}
}

// learn remembers a peer address for the rounds to come.
func (a *Attempt) learn(k pairKey) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.known[k] && len(a.learned) < maxLearned {
		a.known[k] = true
		a.learned = append(a.learned, k)
	}
}

// trigger starts a check toward where a check came from, unless one is running: the
// peer's packet has just shown that its NAT lets ours through from there.
func (a *Attempt) trigger(r *round, k pairKey) {
	a.learn(k)
	r.mu.Lock()
	if r.stopped || r.triggered[k] || len(r.triggered) >= maxTriggered {
		r.mu.Unlock()
		return
	}
	r.triggered[k] = true
	r.wg.Add(1)
	r.mu.Unlock()
	a.count(func(c *counters) { c.checks++ })
	go func() {
		defer r.wg.Done()
		a.runCheck(r.ctx, r, k, a.cfg.AckSpacing/2, a.cfg.CheckInterval)
	}()
}

func (a *Attempt) count(f func(*counters)) {
	a.mu.Lock()
	f(&a.stats)
	a.mu.Unlock()
}

// round is one attempt of Run: its checks, probes and deadline.
type round struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	valid  chan validation // the first validated path (initiator only)
	// hitCtx ends with the round or at the first sign of the peer (a valid check or
	// response): birthday probes and the hard side's checks stop then.
	hitCtx context.Context
	hit    context.CancelFunc

	mu        sync.Mutex
	stopped   bool
	triggered map[pairKey]bool
	wg        sync.WaitGroup
}

// spawn runs f in a goroutine of the round, unless the round has stopped.
func (r *round) spawn(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopped {
		return
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		f()
	}()
}

var (
	errRoundOver = errors.New("punch: attempt over")
	errNoAnswer  = errors.New("no answer in time")
)

func (a *Attempt) startRound(ctx context.Context, timeout time.Duration) *round {
	rctx, cancel := context.WithCancelCause(ctx)
	r := &round{ctx: rctx, valid: make(chan validation, 1), triggered: map[pairKey]bool{}}
	r.hitCtx, r.hit = context.WithCancel(rctx)
	t := a.cfg.Clock.AfterFunc(timeout, func() { cancel(ErrTimeout) })
	r.cancel = func(err error) {
		t.Stop()
		cancel(err)
	}
	a.mu.Lock()
	a.cur = r
	a.mu.Unlock()
	return r
}

// endRound stops the round's checks and probes and waits for them.
func (a *Attempt) endRound(r *round, why string) {
	a.e.debug("punch: attempt over", "session", a.session, "side", a.self, "why", why)
	a.mu.Lock()
	if a.cur == r {
		a.cur = nil
	}
	a.mu.Unlock()
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.cancel(errRoundOver)
	r.wg.Wait()
}

// plan is what Run sends: checks on candidate paths, in order, and birthday probes.
type plan struct {
	checks    []pairKey
	probeIP   netip.Addr
	probeWait time.Duration // until the hard side's sockets are all open toward us
}

func (a *Attempt) plan(p Params) (plan, error) {
	var pl plan
	seen := map[pairKey]bool{}
	add := func(m *mux.Mux, dsts ...netip.AddrPort) {
		for _, d := range dsts {
			d = unmap(d)
			k := pairKey{m, d}
			if d.IsValid() && d.Port() != 0 && !seen[k] {
				seen[k] = true
				pl.checks = append(pl.checks, k)
			}
		}
	}
	pub := publicTargets(p, a.remote)
	predicted := func() []netip.AddrPort {
		ip := p.RemotePrediction.IP
		if !ip.IsValid() && len(pub) > 0 {
			ip = pub[0].Addr()
		}
		var out []netip.AddrPort
		for _, port := range p.RemotePrediction.Ports[:min(len(p.RemotePrediction.Ports), maxPorts)] {
			if ip.IsValid() && port != 0 {
				out = append(out, netip.AddrPortFrom(ip, port))
			}
		}
		return out
	}
	t := a.step.Technique
	switch {
	case t == nat.Local:
		add(a.main, p.RemoteHost...)
		add(a.main, p.RemoteReflexive...)
	case t == nat.Direct || t == nat.Reversal || t == nat.SimplePunch || a.role.simple:
		add(a.main, p.RemoteReflexive...)
		add(a.main, p.RemoteHost...)
	case a.role.fresh && (t == nat.PredictPreservation || t == nat.PredictContiguity):
		// The first packet from the fresh socket must go to the peer's public
		// address: it makes the mapping that was predicted and opens the filter
		// for the peer's checks.
		add(a.fresh, pub...)
	case a.role.fresh:
		// Interleaved: both fresh sockets check the other's predictions in order,
		// so under per-destination mapping the k-th mapping of each meets the
		// other's k-th.
		add(a.fresh, predicted()...)
	case a.role.hard:
		for _, m := range a.hard {
			add(m, pub...)
		}
	case a.role.probe:
		pl.probeIP = p.RemotePrediction.IP
		if !pl.probeIP.IsValid() && len(pub) > 0 {
			pl.probeIP = pub[0].Addr()
		}
		if !pl.probeIP.IsValid() {
			return plan{}, fmt.Errorf("%w: no public IP of the peer to probe", ErrBadParams)
		}
		n := min(max(p.RemotePrediction.Sockets, 0), MaxBirthdaySockets)
		pl.probeWait = time.Duration(n) * a.cfg.Pace
	default: // the other side of a one-sided prediction
		add(a.main, predicted()...)
	}
	if len(pl.checks) == 0 && !pl.probeIP.IsValid() {
		return plan{}, fmt.Errorf("%w: nothing to check for %v as side %v (missing candidates or prediction)", ErrBadParams, a.step, a.self)
	}
	return pl, nil
}

// Run punches: from the agreed start it checks the candidate paths, answers the peer's
// checks and, for birthday probing, probes; it returns the first path the initiator
// nominates. Each attempt lasts Params.Timeout; after Params.MaxAttempts it fails with a
// *FailError. Cancelling ctx or closing the attempt stops it promptly. Run may be called
// once.
func (a *Attempt) Run(ctx context.Context, p Params) (Result, error) {
	timeout := cmp.Or(p.Timeout, a.cfg.Timeout)
	attempts := cmp.Or(p.MaxAttempts, a.cfg.MaxAttempts)
	if timeout < 0 || attempts < 0 {
		return Result{}, fmt.Errorf("%w: negative timeout or attempts", ErrBadParams)
	}
	pl, err := a.plan(p)
	if err != nil {
		return Result{}, err
	}
	a.mu.Lock()
	switch {
	case a.closed:
		a.mu.Unlock()
		return Result{}, a.fail(0, ErrClosed)
	case a.ran:
		a.mu.Unlock()
		return Result{}, fmt.Errorf("%w: Run called twice", ErrBadParams)
	}
	a.ran = true
	a.wg.Add(1)
	a.mu.Unlock()
	defer a.wg.Done()

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := context.AfterFunc(a.ctx, func() { cancel(ErrClosed) })
	defer stop()

	clk := a.cfg.Clock
	called := clk.Now()
	start := p.Start
	if start.IsZero() {
		start = called
	}
	from := start
	if from.Before(called) {
		from = called
	}
	a.mu.Lock()
	a.deadline = start.Add(time.Duration(attempts) * timeout)
	a.mu.Unlock()
	for k := range attempts {
		if !sleep(ctx, clk, start.Add(time.Duration(k)*timeout).Sub(clk.Now())) {
			return a.end(k, from, context.Cause(ctx))
		}
		select {
		case <-a.nominated:
			return a.end(k, from, nil)
		default:
		}
		r := a.startRound(ctx, timeout)
		a.launch(r, pl)
		select {
		case v := <-r.valid:
			a.endRound(r, "validated")
			// Only one path is ever nominated: the responder takes the first
			// nomination it hears, even if its answers are lost. So a nomination
			// is repeated until the last attempt's end, at least one Timeout.
			end := start.Add(time.Duration(attempts) * timeout)
			res, err := a.nominate(ctx, v, max(end.Sub(clk.Now()), timeout))
			if err == nil {
				res.Attempts, res.Elapsed = k+1, clk.Now().Sub(from)
				return a.succeed(res), nil
			}
			if ctx.Err() != nil {
				return a.end(k+1, from, context.Cause(ctx))
			}
			return a.end(k+1, from, fmt.Errorf("%w: %w", ErrUnconfirmed, err))
		case <-a.nominated:
			a.endRound(r, "nominated")
			return a.end(k+1, from, nil)
		case <-r.ctx.Done():
			a.endRound(r, "over")
			if ctx.Err() != nil {
				return a.end(k+1, from, context.Cause(ctx))
			}
		}
	}
	return a.end(attempts, from, ErrTimeout)
}

// end finishes a Run that did not validate and nominate a path itself: unless it was
// cancelled, with the responder's accepted nomination if there is one (it may have come
// at any moment), and otherwise with a *FailError for cause.
func (a *Attempt) end(attempts int, from time.Time, cause error) (Result, error) {
	a.mu.Lock()
	a.finished = true
	nm := a.accepted
	if cause != nil && cause != ErrTimeout {
		nm = nil
	}
	if cause == ErrTimeout && a.self == nat.SideB && a.stats.answered > 0 {
		cause = ErrNotNominated
	}
	if nm != nil {
		// The initiator repeats its nomination until its last attempt ends.
		a.linger = a.deadline
		if least := a.cfg.Clock.Now().Add(a.cfg.Timeout); a.linger.Before(least) {
			a.linger = least
		}
	}
	a.mu.Unlock()
	if nm == nil {
		return Result{}, a.fail(attempts, cause)
	}
	return a.nominee(*nm, max(attempts, 1), from), nil
}

// launch starts a round's checks, paced, and its probes.
func (a *Attempt) launch(r *round, pl plan) {
	checks := pl.checks
	a.mu.Lock()
	for _, k := range a.learned {
		if !slices.Contains(checks, k) {
			checks = append(checks, k)
		}
	}
	a.stats.checks += len(checks)
	a.mu.Unlock()
	var ordered, rest []pairKey
	for _, k := range checks {
		if k.local == a.fresh {
			ordered = append(ordered, k)
		} else {
			rest = append(rest, k)
		}
	}
	for i, k := range rest {
		ctx, rto := r.ctx, a.cfg.CheckInterval
		if a.role.hard && k.local != a.main {
			// A birthday socket's check opens its NAT's filter toward the easy side.
			// All of them go to the same address, so they take turns: each socket
			// resends only once all have sent, keeping that address to one packet
			// per Pace. Once the peer is heard the path is on the socket it was
			// heard on, and the others' retransmissions would only flood the peer.
			ctx, rto = r.hitCtx, max(rto, time.Duration(len(a.hard))*a.cfg.Pace)
		}
		r.spawn(func() { a.runCheck(ctx, r, k, time.Duration(i)*a.cfg.Pace, rto) })
	}
	if len(ordered) > 0 {
		// The fresh socket's mappings must be made in the predicted order (its first
		// one keeps the preserved port; the k-th of a contiguous allocator meets the
		// peer's k-th), so each check starts once the one before has sent.
		r.spawn(func() {
			for i, k := range ordered {
				if i > 0 && !sleep(r.ctx, a.cfg.Clock, a.cfg.Pace) {
					return
				}
				sent := a.freshConn.expect(k.remote)
				r.spawn(func() { a.runCheck(r.ctx, r, k, 0, a.cfg.CheckInterval) })
				select {
				case <-sent:
				case <-r.ctx.Done():
					return
				}
			}
		})
	}
	if pl.probeIP.IsValid() {
		r.spawn(func() { a.probe(r, pl.probeIP, pl.probeWait) })
	}
}

// runCheck checks the path k after delay, retransmitting from rto on (growing by half
// each time) until a valid response or the end of ctx (the round's, or its hit context).
func (a *Attempt) runCheck(ctx context.Context, r *round, k pairKey, delay, rto time.Duration) {
	if !sleep(ctx, a.cfg.Clock, delay) {
		return
	}
	for ctx.Err() == nil {
		id := stun.NewTransactionID()
		req := buildCheck(id, a.session, a.self, a.key, false, netip.AddrPort{})
		sent := a.cfg.Clock.Now()
		resp, src, err := k.local.Transact(ctx, k.remote, id, req, rto)
		if err != nil {
			return // the round is over, the socket closed, or the destination is unreachable
		}
		mapped, err := parseResponse(resp, a.key)
		if err != nil {
			continue // not from the peer: keep checking
		}
		v := validation{pair: k, source: unmap(src), reflexive: mapped, rtt: a.cfg.Clock.Now().Sub(sent)}
		a.e.debug("punch: validated", "session", a.session, "side", a.self, "local", k.local.LocalAddr(), "remote", k.remote, "round over", r.ctx.Err() != nil)
		a.mu.Lock()
		a.stats.answered++
		if _, ok := a.validated[k]; !ok {
			a.validated[k] = v
		}
		a.mu.Unlock()
		r.hit()
		if a.self == nat.SideA {
			select {
			case r.valid <- v:
			default:
			}
		}
		return
	}
}

// probeBurst is how many probes a late wake-up may send at once to catch up with the
// schedule, each to a different port.
const probeBurst = 4

// probe sends birthday probes to random ports of ip, one per ProbeInterval on average,
// until the first hit or BirthdayProbes.
func (a *Attempt) probe(r *round, ip netip.Addr, wait time.Duration) {
	clk, every := a.cfg.Clock, a.cfg.ProbeInterval
	if !sleep(r.hitCtx, clk, wait) {
		return
	}
	next := clk.Now()
	for sent := 0; sent < a.cfg.BirthdayProbes; {
		if r.hitCtx.Err() != nil {
			return
		}
		// Send what is due, so timers that fire late (a loaded host) do not stretch
		// the probing past the attempt; a debt beyond one burst is forgiven.
		now := clk.Now()
		if behind := now.Sub(next); behind > time.Duration(probeBurst)*every {
			next = now.Add(-time.Duration(probeBurst-1) * every)
		}
		for n := 0; n < probeBurst && sent < a.cfg.BirthdayProbes && !next.After(now); n++ {
			dst := netip.AddrPortFrom(ip, a.randomPort())
			id := stun.NewTransactionID()
			// Fire and forget: a hit is answered by the hard side's triggered
			// check, so probes need no transaction of their own.
			if err := a.main.WriteTo(buildCheck(id, a.session, a.self, a.key, false, netip.AddrPort{}), dst); err != nil {
				a.e.debug("punch: probe failed", "to", dst, "err", err)
			}
			a.count(func(c *counters) { c.probes++ })
			sent++
			next = next.Add(every)
		}
		if !sleep(r.hitCtx, clk, next.Sub(clk.Now())) {
			return
		}
	}
}

// randomPort draws a port not yet probed in this Run.
func (a *Attempt) randomPort() uint16 {
	if len(a.tried) >= portSpan/2 {
		clear(a.tried)
	}
	for {
		p := uint16(minPort + rand.IntN(portSpan))
		if !a.tried[p] {
			a.tried[p] = true
			return p
		}
	}
}

// nominate tells the peer which path both will use, and waits for its answer.
func (a *Attempt) nominate(ctx context.Context, v validation, timeout time.Duration) (Result, error) {
	nctx, cancel := withTimeout(ctx, a.cfg.Clock, timeout, errNoAnswer)
	defer cancel()
	for {
		id := stun.NewTransactionID()
		req := buildCheck(id, a.session, a.self, a.key, true, v.source)
		sent := a.cfg.Clock.Now()
		resp, _, err := v.pair.local.Transact(nctx, v.pair.remote, id, req, a.cfg.CheckInterval)
		if err != nil {
			if nctx.Err() != nil {
				return Result{}, context.Cause(nctx)
			}
			return Result{}, err
		}
		mapped, err := parseResponse(resp, a.key)
		if err != nil {
			continue
		}
		return Result{
			Local:     v.pair.local,
			Remote:    v.pair.remote,
			Reflexive: mapped,
			Technique: a.step.Technique,
			RTT:       a.cfg.Clock.Now().Sub(sent),
		}, nil
	}
}

// nominee is the responder's Result for the initiator's nomination.
func (a *Attempt) nominee(nm nomination, attempts int, from time.Time) Result {
	a.mu.Lock()
	rtt := a.validated[nm.pair].rtt
	a.mu.Unlock()
	return a.succeed(Result{
		Local:     nm.pair.local,
		Remote:    nm.pair.remote,
		Reflexive: nm.seen,
		Technique: a.step.Technique,
		RTT:       rtt,
		Attempts:  attempts,
		Elapsed:   a.cfg.Clock.Now().Sub(from),
	})
}

// succeed hands res.Local to the caller if the attempt opened it, closes the attempt's
// other sockets and reports the reflexive address.
func (a *Attempt) succeed(res Result) Result {
	a.mu.Lock()
	a.finished = true
	if res.Local != a.main {
		a.keep = res.Local
	}
	spare := a.spare()
	a.mu.Unlock()
	for _, m := range spare {
		m.Close()
	}
	if a.cfg.Observe != nil && res.Reflexive.IsValid() {
		a.cfg.Observe(res.Reflexive)
	}
	return res
}

// spare lists the attempt's own sockets except one handed to the caller. a.mu is held.
func (a *Attempt) spare() []*mux.Mux {
	var out []*mux.Mux
	for _, m := range append([]*mux.Mux{a.fresh}, a.hard...) {
		if m != nil && m != a.keep {
			out = append(out, m)
		}
	}
	return out
}

func (a *Attempt) fail(attempts int, cause error) error {
	if cause == nil {
		cause = ErrTimeout
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return &FailError{
		Technique: a.step.Technique,
		Attempts:  attempts,
		Checks:    a.stats.checks,
		Probes:    a.stats.probes,
		Heard:     a.stats.heard,
		Answered:  a.stats.answered,
		Cause:     cause,
	}
}

// Close stops Run, stops answering the peer and closes the sockets the attempt opened,
// except one handed to the caller in a Result. It never closes the main socket. It is
// idempotent and waits for the attempt's goroutines. A responder that has found its path
// keeps confirming it to the initiator's repeated nominations (which need no goroutine)
// until the initiator's last attempt would have ended, so closing right after Run is
// safe.
func (a *Attempt) Close() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		a.wg.Wait()
		return nil
	}
	a.closed = true
	for pt := range a.timers {
		if pt.t.Stop() {
			a.wg.Done()
		}
	}
	clear(a.timers)
	a.mu.Unlock()
	a.cancel(ErrClosed)
	if !a.lingering() {
		a.e.unregister(a)
	}
	a.wg.Wait()
	a.mu.Lock()
	spare := a.spare()
	a.mu.Unlock()
	for _, m := range spare {
		m.Close()
	}
	return nil
}

// lingering reports whether the attempt, closed or not, still answers its nomination;
// the engine keeps a lingering attempt's session until then, and needs no timer for it.
func (a *Attempt) lingering() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg.Clock.Now().Before(a.linger)
}

// closedNow reports whether Close has been called.
func (a *Attempt) closedNow() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closed
}

// expired reports whether the attempt is closed and done lingering.
func (a *Attempt) expired() bool {
	a.mu.Lock()
	closed := a.closed
	a.mu.Unlock()
	return closed && !a.lingering()
}

// watchConn tells when the first packet to a destination has been sent.
type watchConn struct {
	net.PacketConn
	mu   sync.Mutex
	wait map[netip.AddrPort]chan struct{}
}

// expect returns a channel closed once a packet to dst has been written.
func (c *watchConn) expect(dst netip.AddrPort) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.wait[dst]
	if ch == nil {
		ch = make(chan struct{})
		c.wait[dst] = ch
	}
	return ch
}

// Unwrap returns the socket, for the mux's batched sends and offloaded reads: they
// come after punching, when nothing waits for a first packet any more.
func (c *watchConn) Unwrap() net.PacketConn { return c.PacketConn }

func (c *watchConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	n, err := c.PacketConn.WriteTo(b, addr)
	if ua, ok := addr.(*net.UDPAddr); ok {
		dst := unmap(ua.AddrPort())
		c.mu.Lock()
		if ch := c.wait[dst]; ch != nil {
			close(ch)
			delete(c.wait, dst)
		}
		c.mu.Unlock()
	}
	return n, err
}

func unmap(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}
