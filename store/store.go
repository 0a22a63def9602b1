// Package store is the state rendezvous servers share — published NAT profiles, presence,
// the relay registry and parties — and the routing that carries signaling between servers.
//
// Backends: memstore (one process, no setup; the default) and natsstore (JetStream
// key-value buckets and NATS subjects, so several rendezvous servers act as one).
package store

import (
	"context"
	"errors"
	"time"
)

// Bucket names a key-value namespace. Every value in a bucket expires a fixed time (the
// bucket's TTL) after it was last Put.
type Bucket string

// The buckets a rendezvous server uses.
const (
	// Profiles holds each node's signed, published connection information.
	Profiles Bucket = "profiles"
	// Presence holds each node's last-seen record.
	Presence Bucket = "presence"
	// Relays holds the relay registry; relays re-register (heartbeat) well within its TTL.
	Relays Bucket = "relays"
	// Parties holds each party (package party) as JSON, keyed by the party's name.
	Parties Bucket = "parties"
	// Memberships is the index from a node (NodeID text) to the JSON list of the names
	// of its parties, which the servers read to decide who may reach whom.
	Memberships Bucket = "memberships"
)

// Buckets lists every bucket.
var Buckets = []Bucket{Profiles, Presence, Relays, Parties, Memberships}

// TTLs are the lifetimes of the buckets' values. A zero field takes its default.
type TTLs struct {
	Profiles time.Duration // zero: 1 hour; nodes publish again after changes and on reconnect
	Presence time.Duration // zero: 7 days, how long "last seen" is remembered
	Relays   time.Duration // zero: 30 s; a relay that stops heartbeating vanishes this long after
	// Parties and Memberships: zero means 30 days. Every write restarts a value's life:
	// each change to a party (create, join, leave, kick), and, from the rendezvous
	// server, each member connecting (its list every time, its parties at most daily).
	// A party none of whose members connected for that long is forgotten.
	Parties     time.Duration
	Memberships time.Duration
}

// Default TTLs.
const (
	DefaultProfileTTL  = time.Hour
	DefaultPresenceTTL = 7 * 24 * time.Hour
	DefaultRelayTTL    = 30 * time.Second
	DefaultPartyTTL    = 30 * 24 * time.Hour
)

// Of returns the TTL of bucket b, with defaults applied.
func (t TTLs) Of(b Bucket) time.Duration {
	switch b {
	case Profiles:
		return or(t.Profiles, DefaultProfileTTL)
	case Presence:
		return or(t.Presence, DefaultPresenceTTL)
	case Relays:
		return or(t.Relays, DefaultRelayTTL)
	case Parties:
		return or(t.Parties, DefaultPartyTTL)
	case Memberships:
		return or(t.Memberships, DefaultPartyTTL)
	}
	return 0
}

func or(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Errors.
var (
	// ErrNotFound: no live value under the key.
	ErrNotFound = errors.New("store: not found")
	// ErrNoRoute: no server has the node attached (it is offline).
	ErrNoRoute = errors.New("store: no route to node")
	// ErrRejected: the node's server took the frame but could not deliver it; the
	// error is a *RejectedError carrying the reason.
	ErrRejected = errors.New("store: delivery rejected")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("store: closed")
	// ErrUnknownBucket: a bucket not in Buckets.
	ErrUnknownBucket = errors.New("store: unknown bucket")
	// ErrConflict: Update found the key at another revision than the caller read (or,
	// for revision 0, found it existing). Read again and retry.
	ErrConflict = errors.New("store: conflicting update")
)

// RejectedError is a Handler's refusal, carried back to the router. Reason is the
// handler's error text (for rendezvous servers, a wire error code such as "overloaded").
type RejectedError struct{ Reason string }

func (e *RejectedError) Error() string { return "store: delivery rejected: " + e.Reason }

// Is makes errors.Is(err, ErrRejected) true.
func (e *RejectedError) Is(target error) bool { return target == ErrRejected }

// Reject turns a Handler's error into what Route returns for it: ErrNoRoute stays
// ErrNoRoute (the node left while the frame was in flight), anything else becomes a
// *RejectedError.
func Reject(err error) error {
	if err == nil || errors.Is(err, ErrNoRoute) {
		return err
	}
	var re *RejectedError
	if errors.As(err, &re) {
		return re
	}
	return &RejectedError{Reason: err.Error()}
}

// Entry is one key and value of a bucket.
type Entry struct {
	Key   string
	Value []byte
}

// KV is the key-value half of a Store. Keys are NodeID text forms, or party names.
type KV interface {
	Put(ctx context.Context, b Bucket, key string, value []byte) error
	// Get returns ErrNotFound when there is no live value.
	Get(ctx context.Context, b Bucket, key string) ([]byte, error)
	// Delete removes the key; deleting a missing key is not an error.
	Delete(ctx context.Context, b Bucket, key string) error
	// List returns every live entry of b, in no particular order.
	List(ctx context.Context, b Bucket) ([]Entry, error)

	// GetRev is Get that also returns the value's revision, for Update. Revisions of
	// one key only grow; they are never 0 for a live value.
	GetRev(ctx context.Context, b Bucket, key string) (value []byte, rev uint64, err error)
	// Update is a compare-and-swap Put: it stores value only if key is still at rev, or,
	// for rev 0, only if key has no live value. Otherwise it returns ErrConflict. Several
	// rendezvous servers changing one party at once use it so no change is lost.
	Update(ctx context.Context, b Bucket, key string, value []byte, rev uint64) error
}

// Handler takes a frame routed to an attached node. It runs on the router's goroutine and
// must not block: queue the frame and return. A non-nil error is reported to the sender
// (see Reject).
type Handler func(frame []byte) error

// Router carries frames to whichever server a node is attached to.
type Router interface {
	// Attach makes this process the route to node until detach is called. Attaching a
	// node again replaces the earlier handler; an old detach then does nothing.
	Attach(node string, h Handler) (detach func(), err error)
	// Route hands frame to node's handler wherever it is attached. It returns
	// ErrNoRoute when no server has the node, or the handler's error (see Reject).
	Route(ctx context.Context, node string, frame []byte) error
	// Online reports whether some server has node attached.
	Online(ctx context.Context, node string) (bool, error)
}

// Store is a backend: shared state and routing. Close is idempotent.
type Store interface {
	KV
	Router
	Close() error
}

// Known reports whether b is one of Buckets.
func Known(b Bucket) bool {
	for _, k := range Buckets {
		if b == k {
			return true
		}
	}
	return false
}
