package relayreg

import (
	"context"
	"sync"

	"peerlink/identity"
	"peerlink/relay"
)

// Registrar keeps a relay server registered through an Announcer: it is the
// relay.Config.Registrar of a relay process (announcing through its rendezvous client) or
// of a relay in the rendezvous server's own process (announcing to the Registry).
// Every heartbeat re-sends the whole registration, so a registry that lost the relay (a
// restarted server, an expired entry) has it back within one heartbeat.
type Registrar struct {
	// Announcer is where registrations go.
	Announcer Announcer
	// NodeID is the relay's node; a rendezvous client ignores it (the server uses the
	// connection's node), a Registry needs it.
	NodeID identity.NodeID

	mu   sync.Mutex
	info Info
}

var _ relay.Registrar = (*Registrar)(nil)

// Register announces the relay's endpoints and capacity.
func (r *Registrar) Register(ctx context.Context, reg relay.Registration) error {
	eps := make([]Endpoint, 0, len(reg.Endpoints))
	for _, e := range reg.Endpoints {
		eps = append(eps, Endpoint{Transport: Transport(e.Transport), Addr: e.Addr})
	}
	r.mu.Lock()
	r.info = Info{NodeID: r.NodeID, Endpoints: eps, Capacity: reg.MaxSessions}
	info := r.info
	r.mu.Unlock()
	return r.Announcer.RegisterRelay(ctx, info)
}

// Heartbeat announces the relay's load. A relay that is draining (not taking new
// sessions) is announced as full, so that finders pass it by.
func (r *Registrar) Heartbeat(ctx context.Context, l relay.Load) error {
	r.mu.Lock()
	info := r.info
	r.mu.Unlock()
	info.Load = l.Sessions
	if !l.Enabled {
		info.Capacity = max(l.Sessions, 1)
		info.Load = info.Capacity
	}
	return r.Announcer.RegisterRelay(ctx, info)
}
