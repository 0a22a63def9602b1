package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"peerlink/identity"
	"peerlink/relayreg"
	"peerlink/signal"
)

// rendezvousAnnouncer registers a relay through a connection to the rendezvous server,
// dialling again after a failure, so that a rendezvous server that restarted gets the
// relay back at the next heartbeat.
type rendezvousAnnouncer struct {
	url string
	id  *identity.Identity
	log *slog.Logger

	mu sync.Mutex
	c  *signal.Client
}

// RegisterRelay sends info, connecting first when there is no connection.
func (a *rendezvousAnnouncer) RegisterRelay(ctx context.Context, info relayreg.Info) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.c == nil {
		c, err := signal.Dial(ctx, a.url, a.id, &signal.Options{Logger: a.log})
		if err != nil {
			return fmt.Errorf("rendezvous server %s: %w", a.url, err)
		}
		a.c = c
		if a.log != nil {
			a.log.Info("relay registering with the rendezvous server", "url", a.url, "node", a.id.NodeID())
		}
	}
	if err := a.c.RegisterRelay(ctx, info); err != nil {
		a.c.Close()
		a.c = nil
		return err
	}
	return nil
}

// Close closes the rendezvous connection; the registration then lapses with the
// registry's TTL.
func (a *rendezvousAnnouncer) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.c != nil {
		a.c.Close()
		a.c = nil
	}
	return nil
}
