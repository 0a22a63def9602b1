package faultlab

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"peerlink/clock"
	"peerlink/connect"
	"peerlink/signal"
)

// ReconnectConfig says how a Reconnector dials its node's rendezvous server again.
// Zero durations mean their defaults.
type ReconnectConfig struct {
	// Dial opens a new rendezvous client for the node's identity. Required.
	Dial func(ctx context.Context) (*signal.Client, error)
	// Initial is the backoff before the first attempt once the connection ended; zero
	// means 500 ms. A server that restarted is usually back by then, and waiting at
	// all spreads a crowd of clients that lost it at the same moment.
	Initial time.Duration
	// Max caps the backoff, which doubles after every failed attempt; zero means 30 s.
	Max time.Duration
	// Timeout bounds one attempt, the dial and the publication together; zero means 10 s.
	Timeout time.Duration
	// OnReconnect, when not nil, is called from the Reconnector's goroutine after each
	// reconnection; it must not block for long.
	OnReconnect func(Reconnection)
	// Clock times the backoff; nil means the real clock.
	Clock clock.Clock
	// Logger receives a line per reconnection and failed attempt; nil means quiet.
	Logger *slog.Logger
}

func (c ReconnectConfig) initial() time.Duration {
	if c.Initial <= 0 {
		return 500 * time.Millisecond
	}
	return c.Initial
}

func (c ReconnectConfig) max() time.Duration {
	if c.Max <= 0 {
		return 30 * time.Second
	}
	return max(c.Max, c.initial())
}

func (c ReconnectConfig) timeout() time.Duration {
	if c.Timeout <= 0 {
		return 10 * time.Second
	}
	return c.Timeout
}

// Reconnection is one recovery of a node's rendezvous connection.
type Reconnection struct {
	// Lost is when the old connection was seen to end; Up is when the node had
	// published itself on the new one.
	Lost, Up time.Time
	// Attempts counts the dials, the one that worked included.
	Attempts int
	// LastErr is why the attempt before the one that worked failed (nil when the
	// first worked).
	LastErr error
}

// Took is how long the node could not be reached through the rendezvous server.
func (r Reconnection) Took() time.Duration { return r.Up.Sub(r.Lost) }

// ErrNoDial is returned by Reconnect for a ReconnectConfig without Dial.
var ErrNoDial = errors.New("faultlab: ReconnectConfig.Dial is required")

// Reconnector keeps a node on its rendezvous server the way an agent does: when the
// client's connection ends (the server restarted, the network moved), it dials again
// with a doubling, jittered backoff and gives the node the new client
// (connect.Node.SetSignal), so that the node's connections live on and it is
// reachable under the same identity.
type Reconnector struct {
	n      *connect.Node
	cfg    ReconnectConfig
	clock  clock.Clock
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once

	mu      sync.Mutex
	cur     *signal.Client
	history []Reconnection
}

// Reconnect starts keeping n on its rendezvous server; sc is the client n was started
// with. The Reconnector owns sc and every client it dials: Close closes the current
// one (close the node first, so that its goodbyes still go out).
func Reconnect(n *connect.Node, sc *signal.Client, cfg ReconnectConfig) (*Reconnector, error) {
	if cfg.Dial == nil {
		return nil, ErrNoDial
	}
	if n == nil || sc == nil {
		return nil, errors.New("faultlab: Reconnect needs a node and its client")
	}
	ctx, cancel := context.WithCancel(context.Background())
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Reconnector{n: n, cfg: cfg, clock: clock.Or(cfg.Clock), log: log, ctx: ctx, cancel: cancel, done: make(chan struct{}), cur: sc}
	go r.run()
	return r, nil
}

// Client is the rendezvous client the node uses now.
func (r *Reconnector) Client() *signal.Client {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

// Reconnections lists the recoveries so far, oldest first.
func (r *Reconnector) Reconnections() []Reconnection {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Reconnection(nil), r.history...)
}

// Close stops reconnecting, waits for an attempt under way to end and closes the
// current client. It is idempotent.
func (r *Reconnector) Close() error {
	r.once.Do(func() {
		r.cancel()
		<-r.done
		r.Client().Close()
	})
	return nil
}

func (r *Reconnector) run() {
	defer close(r.done)
	for {
		cur := r.Client()
		select {
		case <-r.ctx.Done():
			return
		case <-cur.Done():
		}
		r.log.Info("faultlab: rendezvous connection ended, reconnecting", "err", cur.Err())
		if !r.redial(cur) {
			return
		}
	}
}

// redial dials until the node has a working client, and false when it should stop:
// the Reconnector or the node closed.
func (r *Reconnector) redial(old *signal.Client) bool {
	rec := Reconnection{Lost: r.clock.Now()}
	backoff := r.cfg.initial()
	for {
		if !r.sleep(jitter(backoff)) {
			return false
		}
		rec.Attempts++
		sc, err := r.attempt()
		if err == nil {
			rec.Up = r.clock.Now()
			r.mu.Lock()
			r.cur = sc
			r.history = append(r.history, rec)
			r.mu.Unlock()
			old.Close()
			r.log.Info("faultlab: reconnected to the rendezvous server", "took", rec.Took(), "attempts", rec.Attempts)
			if r.cfg.OnReconnect != nil {
				r.cfg.OnReconnect(rec)
			}
			return true
		}
		if errors.Is(err, connect.ErrClosed) || r.ctx.Err() != nil {
			return false
		}
		rec.LastErr = err
		r.log.Debug("faultlab: reconnecting failed", "attempt", rec.Attempts, "err", err, "backoff", backoff)
		backoff = min(2*backoff, r.cfg.max())
	}
}

// attempt dials once and hands the client to the node.
func (r *Reconnector) attempt() (*signal.Client, error) {
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.timeout())
	defer cancel()
	sc, err := r.cfg.Dial(ctx)
	if err != nil {
		return nil, err
	}
	if err := r.n.SetSignal(ctx, sc); err != nil {
		// The node may hold sc already (the publication failed): the next attempt's
		// client replaces it.
		sc.Close()
		return nil, err
	}
	return sc, nil
}

// jitter draws a wait from [d/2, d): never longer than the backoff, and clients that
// lost the server together come back spread over half of it.
func jitter(d time.Duration) time.Duration {
	if d < 2 {
		return d
	}
	return d/2 + rand.N(d/2)
}

// sleep waits d on the clock; false when the Reconnector closed first.
func (r *Reconnector) sleep(d time.Duration) bool {
	tick := make(chan struct{})
	t := r.clock.AfterFunc(d, func() { close(tick) })
	select {
	case <-tick:
		return true
	case <-r.ctx.Done():
		t.Stop()
		return false
	}
}
