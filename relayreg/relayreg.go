// Package relayreg is the relay registry: relays register their endpoints, capacity and
// load and keep heartbeating; a relay that stops disappears after the registry's TTL.
// Clients choose the best relay for a connection with a Finder, which probes candidates.
package relayreg

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/store"
)

// Transport is how a client reaches a relay endpoint.
type Transport string

// Transports.
const (
	UDP Transport = "udp"
	TCP Transport = "tcp"
	TLS Transport = "tls"
)

// Endpoint is one address of a relay.
type Endpoint struct {
	Transport Transport `json:"transport"`
	// Addr is host:port; host may be a name.
	Addr string `json:"addr"`
}

func (e Endpoint) String() string { return string(e.Transport) + "://" + e.Addr }

// Info is what a relay registers.
type Info struct {
	NodeID    identity.NodeID `json:"nodeID"`
	Endpoints []Endpoint      `json:"endpoints"`
	// Capacity is how many sessions the relay accepts; zero means it does not say.
	Capacity int `json:"capacity"`
	// Load is how many sessions it carries now.
	Load int `json:"load"`
	// Updated is when the registry last heard from the relay (set by the registry).
	Updated time.Time `json:"updated,omitzero"`
}

// Limits on registrations.
const (
	MaxEndpoints = 8
	maxAddrLen   = 255 + 1 + 5
)

// ErrInvalid is wrapped by Validate's errors.
var ErrInvalid = errors.New("relayreg: invalid relay info")

// Validate checks what a relay may register.
func (i Info) Validate() error {
	if i.NodeID.IsZero() {
		return fmt.Errorf("%w: no node ID", ErrInvalid)
	}
	if len(i.Endpoints) == 0 || len(i.Endpoints) > MaxEndpoints {
		return fmt.Errorf("%w: %d endpoints, want 1 to %d", ErrInvalid, len(i.Endpoints), MaxEndpoints)
	}
	for _, e := range i.Endpoints {
		switch e.Transport {
		case UDP, TCP, TLS:
		default:
			return fmt.Errorf("%w: transport %q (want udp, tcp or tls)", ErrInvalid, e.Transport)
		}
		if len(e.Addr) > maxAddrLen {
			return fmt.Errorf("%w: address too long", ErrInvalid)
		}
		host, port, err := net.SplitHostPort(e.Addr)
		if err != nil || host == "" {
			return fmt.Errorf("%w: address %q is not host:port", ErrInvalid, e.Addr)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
			return fmt.Errorf("%w: address %q has no valid port", ErrInvalid, e.Addr)
		}
	}
	if i.Capacity < 0 || i.Load < 0 {
		return fmt.Errorf("%w: negative capacity or load", ErrInvalid)
	}
	return nil
}

// Utilisation is Load/Capacity in [0, 1]; a relay that declares no capacity counts as
// half full, so a declared, lightly loaded relay is preferred over an unknown one.
func (i Info) Utilisation() float64 {
	if i.Capacity <= 0 {
		return 0.5
	}
	return min(1, float64(i.Load)/float64(i.Capacity))
}

// Full reports whether the relay declares a capacity and has reached it.
func (i Info) Full() bool { return i.Capacity > 0 && i.Load >= i.Capacity }

// Registry keeps relay registrations in a store's Relays bucket, so every rendezvous
// server sharing the store sees every relay, and the bucket's TTL removes relays that
// stop heartbeating.
type Registry struct {
	kv    store.KV
	clock clock.Clock
}

// NewRegistry returns a registry over kv; a nil clock means the real one.
func NewRegistry(kv store.KV, clk clock.Clock) *Registry {
	return &Registry{kv: kv, clock: clock.Or(clk)}
}

// Register records (or refreshes: this is the heartbeat) a relay.
func (r *Registry) Register(ctx context.Context, info Info) error {
	if err := info.Validate(); err != nil {
		return err
	}
	info.Updated = r.clock.Now().UTC().Truncate(time.Millisecond)
	b, err := json.Marshal(info)
	if err != nil {
		return fmt.Errorf("relayreg: %w", err)
	}
	return r.kv.Put(ctx, store.Relays, info.NodeID.String(), b)
}

// Unregister removes a relay at once, for relays that shut down cleanly.
func (r *Registry) Unregister(ctx context.Context, id identity.NodeID) error {
	return r.kv.Delete(ctx, store.Relays, id.String())
}

// ListRelays returns the live relays. Records that do not decode are skipped: the store
// is shared, and one bad record must not hide the others.
func (r *Registry) ListRelays(ctx context.Context) ([]Info, error) {
	ents, err := r.kv.List(ctx, store.Relays)
	if err != nil {
		return nil, err
	}
	out := make([]Info, 0, len(ents))
	for _, e := range ents {
		var i Info
		if json.Unmarshal(e.Value, &i) != nil || i.Validate() != nil {
			continue
		}
		out = append(out, i)
	}
	return out, nil
}
