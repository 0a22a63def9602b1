// Package memstore is the in-memory rendezvous store: one process, nothing to set up.
// Several servers in one process that share a memstore route signaling to each other.
package memstore

import (
	"context"
	"fmt"
	"sync"
	"time"

	"peerlink/clock"
	"peerlink/store"
)

// Config configures a Store. The zero value is ready to use.
type Config struct {
	TTLs  store.TTLs  // zero fields take store's defaults
	Clock clock.Clock // nil: the real clock
}

// Store is an in-memory store.Store. It is safe for concurrent use.
type Store struct {
	clock clock.Clock
	ttls  store.TTLs

	mu     sync.RWMutex
	kv     map[store.Bucket]map[string]item
	puts   int
	rev    uint64 // the last revision given to a value
	routes map[string]*route
	closed bool
}

type item struct {
	value   []byte
	expires time.Time
	rev     uint64
}

// route is one Attach; its pointer identifies the registration for detach.
type route struct{ h store.Handler }

var _ store.Store = (*Store)(nil)

// New returns an empty store.
func New(cfg Config) *Store {
	s := &Store{
		clock:  clock.Or(cfg.Clock),
		ttls:   cfg.TTLs,
		kv:     make(map[store.Bucket]map[string]item),
		routes: make(map[string]*route),
	}
	for _, b := range store.Buckets {
		s.kv[b] = make(map[string]item)
	}
	return s
}

// sweepEvery is how many Puts pass between sweeps of expired values, so memory stays
// bounded by the live values plus one sweep's worth of dead ones without a timer.
const sweepEvery = 1024

func (s *Store) bucket(b store.Bucket) (map[string]item, error) {
	if s.closed {
		return nil, store.ErrClosed
	}
	m, ok := s.kv[b]
	if !ok {
		return nil, fmt.Errorf("%w %q", store.ErrUnknownBucket, b)
	}
	return m, nil
}

// Put stores value under key; it expires after the bucket's TTL.
func (s *Store) Put(_ context.Context, b store.Bucket, key string, value []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.bucket(b)
	if err != nil {
		return err
	}
	s.putLocked(b, m, key, value)
	return nil
}

// putLocked puts value under key in m, the map of bucket b. The caller holds s.mu.
func (s *Store) putLocked(b store.Bucket, m map[string]item, key string, value []byte) {
	now := s.clock.Now()
	s.rev++
	m[key] = item{value: append([]byte(nil), value...), expires: now.Add(s.ttls.Of(b)), rev: s.rev}
	s.puts++
	if s.puts%sweepEvery == 0 {
		for _, m := range s.kv {
			for k, it := range m {
				if !now.Before(it.expires) {
					delete(m, k)
				}
			}
		}
	}
}

// Get returns the live value under key or store.ErrNotFound.
func (s *Store) Get(ctx context.Context, b store.Bucket, key string) ([]byte, error) {
	v, _, err := s.GetRev(ctx, b, key)
	return v, err
}

// GetRev returns the live value under key and its revision, or store.ErrNotFound.
func (s *Store) GetRev(_ context.Context, b store.Bucket, key string) ([]byte, uint64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	m, err := s.bucket(b)
	if err != nil {
		return nil, 0, err
	}
	it, ok := m[key]
	if !ok || !s.clock.Now().Before(it.expires) {
		return nil, 0, store.ErrNotFound
	}
	return append([]byte(nil), it.value...), it.rev, nil
}

// Update stores value under key if key is at rev (0: has no live value), else it
// returns store.ErrConflict.
func (s *Store) Update(_ context.Context, b store.Bucket, key string, value []byte, rev uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.bucket(b)
	if err != nil {
		return err
	}
	var cur uint64
	if it, ok := m[key]; ok && s.clock.Now().Before(it.expires) {
		cur = it.rev
	}
	if cur != rev {
		return fmt.Errorf("%w: %s/%s is at revision %d, not %d", store.ErrConflict, b, key, cur, rev)
	}
	s.putLocked(b, m, key, value)
	return nil
}

// Delete removes key.
func (s *Store) Delete(_ context.Context, b store.Bucket, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.bucket(b)
	if err != nil {
		return err
	}
	delete(m, key)
	return nil
}

// List returns the live entries of b.
func (s *Store) List(_ context.Context, b store.Bucket) ([]store.Entry, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	m, err := s.bucket(b)
	if err != nil {
		return nil, err
	}
	now := s.clock.Now()
	var out []store.Entry
	for k, it := range m {
		if now.Before(it.expires) {
			out = append(out, store.Entry{Key: k, Value: append([]byte(nil), it.value...)})
		}
	}
	return out, nil
}

// Attach routes frames for node to h.
func (s *Store) Attach(node string, h store.Handler) (func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, store.ErrClosed
	}
	r := &route{h: h}
	s.routes[node] = r
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if cur, ok := s.routes[node]; ok && cur == r {
			delete(s.routes, node)
		}
	}, nil
}

// Route calls node's handler.
func (s *Store) Route(_ context.Context, node string, frame []byte) error {
	s.mu.RLock()
	r, ok := s.routes[node]
	closed := s.closed
	s.mu.RUnlock()
	if closed {
		return store.ErrClosed
	}
	if !ok {
		return store.ErrNoRoute
	}
	return store.Reject(r.h(frame))
}

// Online reports whether node is attached.
func (s *Store) Online(_ context.Context, node string) (bool, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return false, store.ErrClosed
	}
	_, ok := s.routes[node]
	return ok, nil
}

// Close drops everything. It is idempotent.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.routes = map[string]*route{}
	return nil
}
