package relayreg

import (
	"cmp"
	"context"
	"log/slog"
	"sync"
	"time"
)

// Announcer registers a relay: a rendezvous client for a relay process, or a Registry.
type Announcer interface {
	RegisterRelay(ctx context.Context, info Info) error
}

// RegisterRelay lets a Registry act as an Announcer, for a relay in the rendezvous
// server's own process.
func (r *Registry) RegisterRelay(ctx context.Context, info Info) error { return r.Register(ctx, info) }

// Beacon keeps a relay registered: it registers at once and then every interval, each
// time with fresh Info (so the load is current), until Close.
type Beacon struct {
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

// StartBeacon starts heartbeating. every should be well under the registry's TTL (a
// third of it lets two heartbeats be lost); zero means 10 s, a third of the default TTL.
// Failures are logged to log (nil means quiet) and retried at the next beat.
func StartBeacon(a Announcer, info func() Info, every time.Duration, log *slog.Logger) *Beacon {
	ctx, cancel := context.WithCancel(context.Background())
	b := &Beacon{cancel: cancel, done: make(chan struct{})}
	every = cmp.Or(every, 10*time.Second)
	go func() {
		defer close(b.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			rctx, rcancel := context.WithTimeout(ctx, every)
			err := a.RegisterRelay(rctx, info())
			rcancel()
			if err != nil && ctx.Err() == nil && log != nil {
				log.Warn("relay heartbeat failed", "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return b
}

// Close stops heartbeating and waits for the beacon's goroutine. It is idempotent.
func (b *Beacon) Close() error {
	b.once.Do(b.cancel)
	<-b.done
	return nil
}
