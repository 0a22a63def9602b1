// Package natcache keeps other nodes' NAT profiles on the client side, with a TTL and
// stale-while-revalidate, so connecting to a known peer costs no round trip to the
// rendezvous server.
package natcache

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/nat"
)

// ErrNotFound is returned by Get when the cache holds nothing usable for a node.
var ErrNotFound = errors.New("natcache: not found")

// ErrNoFetcher is returned by Fetch when the cache has no Fetcher.
var ErrNoFetcher = errors.New("natcache: no fetcher configured")

// Fetcher loads a node's published profile; a rendezvous client (signal.Client) is one.
type Fetcher interface {
	FetchProfile(ctx context.Context, node identity.NodeID) (nat.Profile, error)
}

// FetcherFunc adapts a function to Fetcher.
type FetcherFunc func(ctx context.Context, node identity.NodeID) (nat.Profile, error)

// FetchProfile calls f.
func (f FetcherFunc) FetchProfile(ctx context.Context, node identity.NodeID) (nat.Profile, error) {
	return f(ctx, node)
}

// Config configures a Cache. The zero value is a cache without a fetcher (Put and Get
// only) with the defaults below.
type Config struct {
	// Fetcher loads profiles for Fetch, Prewarm and background refreshes; nil means
	// Fetch fails with ErrNoFetcher and stale entries are not refreshed.
	Fetcher Fetcher
	// TTL is how long a Put entry is fresh; zero means 300 s.
	TTL time.Duration
	// MaxStale is how long after its TTL an entry is still served as stale while it is
	// refreshed; after that Get treats it as missing. Zero means one hour.
	MaxStale time.Duration
	// MaxEntries bounds the cache; zero means 10,000. When full, a new entry evicts
	// the least recently used of a small random sample.
	MaxEntries int
	// FetchTimeout bounds each fetch; zero means 10 s.
	FetchTimeout time.Duration
	// RetryAfter is how long a failed background refresh waits before the next stale
	// hit may try again; zero means 5 s.
	RetryAfter time.Duration
	// PrewarmConcurrency caps Prewarm's fetches in flight; zero means 10.
	PrewarmConcurrency int
	// Clock is the time source; nil means the real clock.
	Clock clock.Clock
	// Logger receives refresh failures; nil means quiet.
	Logger *slog.Logger
}

// Stats are a cache's counters.
type Stats struct {
	Size      int    // entries held
	Hits      uint64 // fresh hits
	Misses    uint64 // lookups that found nothing usable
	StaleHits uint64 // hits on stale entries (each may start a refresh)
	Evictions uint64 // entries removed for room or for being past MaxStale
}

// Cache is a bounded NAT profile cache. It is safe for concurrent use; Get takes only a
// read lock and atomics.
type Cache struct {
	cfg   Config
	clock clock.Clock
	log   *slog.Logger

	mu sync.RWMutex
	m  map[identity.NodeID]*entry

	hits, misses, staleHits, evictions atomic.Uint64

	fmu     sync.Mutex
	flights map[identity.NodeID]*flight
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// entry is immutable once stored except for its atomics; Put replaces the pointer.
type entry struct {
	profile      nat.Profile
	fresh, dead  time.Time // fresh until, usable (stale) until
	used         atomic.Int64
	refreshAfter atomic.Int64
}

type flight struct {
	done chan struct{}
	p    nat.Profile
	err  error
}

// New returns an empty cache. Close it to stop background refreshes.
func New(cfg Config) *Cache {
	cfg.TTL = cmp.Or(cfg.TTL, 300*time.Second)
	cfg.MaxStale = cmp.Or(cfg.MaxStale, time.Hour)
	cfg.MaxEntries = cmp.Or(cfg.MaxEntries, 10_000)
	cfg.FetchTimeout = cmp.Or(cfg.FetchTimeout, 10*time.Second)
	cfg.RetryAfter = cmp.Or(cfg.RetryAfter, 5*time.Second)
	cfg.PrewarmConcurrency = cmp.Or(cfg.PrewarmConcurrency, 10)
	ctx, cancel := context.WithCancel(context.Background())
	c := &Cache{
		cfg:     cfg,
		clock:   clock.Or(cfg.Clock),
		log:     cfg.Logger,
		m:       make(map[identity.NodeID]*entry),
		flights: make(map[identity.NodeID]*flight),
		ctx:     ctx,
		cancel:  cancel,
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	return c
}

// Get returns node's cached profile. stale is true when the entry is past its TTL but
// within MaxStale: it is still returned, and a background refresh starts (at most one
// at a time per node). With nothing usable it returns ErrNotFound.
func (c *Cache) Get(node identity.NodeID) (p nat.Profile, stale bool, err error) {
	c.mu.RLock()
	e := c.m[node]
	c.mu.RUnlock()
	if e == nil {
		c.misses.Add(1)
		return nat.Profile{}, false, ErrNotFound
	}
	now := c.clock.Now()
	switch {
	case now.Before(e.fresh):
		e.used.Store(now.UnixNano())
		c.hits.Add(1)
		return e.profile, false, nil
	case now.Before(e.dead):
		e.used.Store(now.UnixNano())
		c.staleHits.Add(1)
		c.refresh(node, e, now)
		return e.profile, true, nil
	}
	c.remove(node, e)
	c.misses.Add(1)
	return nat.Profile{}, false, ErrNotFound
}

// remove deletes e if it is still node's entry, counting an eviction.
func (c *Cache) remove(node identity.NodeID, e *entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m[node] == e {
		delete(c.m, node)
		c.evictions.Add(1)
	}
}

// refresh starts a background fetch for a stale entry unless one ran recently.
func (c *Cache) refresh(node identity.NodeID, e *entry, now time.Time) {
	if c.cfg.Fetcher == nil {
		return
	}
	next := e.refreshAfter.Load()
	if now.UnixNano() < next || !e.refreshAfter.CompareAndSwap(next, now.Add(c.cfg.RetryAfter).UnixNano()) {
		return
	}
	c.startFlight(node)
}

// startFlight returns node's fetch in progress, starting one if there is none. The fetch
// belongs to the cache, not to a caller, so one caller giving up does not cancel it for
// the others.
func (c *Cache) startFlight(node identity.NodeID) *flight {
	c.fmu.Lock()
	defer c.fmu.Unlock()
	if f := c.flights[node]; f != nil {
		return f
	}
	f := &flight{done: make(chan struct{})}
	if c.ctx.Err() != nil {
		f.err = context.Canceled
		close(f.done)
		return f
	}
	c.flights[node] = f
	c.wg.Go(func() {
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.FetchTimeout)
		p, err := c.cfg.Fetcher.FetchProfile(ctx, node)
		cancel()
		if err == nil {
			c.Put(node, p)
		} else {
			c.log.Debug("natcache: fetch failed", "node", node.Short(), "err", err)
		}
		c.fmu.Lock()
		delete(c.flights, node)
		c.fmu.Unlock()
		f.p, f.err = p, err
		close(f.done)
	})
	return f
}

// Fetch returns node's profile from the cache when it is fresh, and otherwise loads it
// with the Fetcher (one load per node at a time, however many callers) and caches it.
func (c *Cache) Fetch(ctx context.Context, node identity.NodeID) (nat.Profile, error) {
	c.mu.RLock()
	e := c.m[node]
	c.mu.RUnlock()
	now := c.clock.Now()
	if e != nil && now.Before(e.fresh) {
		e.used.Store(now.UnixNano())
		c.hits.Add(1)
		return e.profile, nil
	}
	c.misses.Add(1)
	if c.cfg.Fetcher == nil {
		return nat.Profile{}, ErrNoFetcher
	}
	f := c.startFlight(node)
	select {
	case <-f.done:
		if f.err != nil {
			return nat.Profile{}, fmt.Errorf("natcache: fetch %s: %w", node.Short(), f.err)
		}
		return f.p, nil
	case <-ctx.Done():
		return nat.Profile{}, ctx.Err()
	}
}

// Put caches p for node with the default TTL.
func (c *Cache) Put(node identity.NodeID, p nat.Profile) { c.PutTTL(node, p, c.cfg.TTL) }

// PutTTL caches p for node, fresh for ttl.
func (c *Cache) PutTTL(node identity.NodeID, p nat.Profile, ttl time.Duration) {
	now := c.clock.Now()
	e := &entry{profile: p, fresh: now.Add(ttl), dead: now.Add(ttl + c.cfg.MaxStale)}
	e.used.Store(now.UnixNano())
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[node]; !ok && len(c.m) >= c.cfg.MaxEntries {
		c.evictLocked(now)
	}
	c.m[node] = e
}

// evictSample is how many entries eviction looks at. Go's map iteration starts at a
// random place, so the sample is random; the least recently used of eight approximates
// LRU well without a list that every hit would have to lock.
const evictSample = 8

func (c *Cache) evictLocked(now time.Time) {
	var victim identity.NodeID
	oldest := int64(1<<63 - 1)
	n := 0
	for k, e := range c.m {
		if !now.Before(e.dead) {
			victim = k
			break
		}
		if u := e.used.Load(); u < oldest {
			victim, oldest = k, u
		}
		if n++; n == evictSample {
			break
		}
	}
	delete(c.m, victim)
	c.evictions.Add(1)
}

// Invalidate drops node's entry, so the next Fetch loads it again.
func (c *Cache) Invalidate(node identity.NodeID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, node)
}

// Stats returns the cache's counters.
func (c *Cache) Stats() Stats {
	c.mu.RLock()
	size := len(c.m)
	c.mu.RUnlock()
	return Stats{Size: size, Hits: c.hits.Load(), Misses: c.misses.Load(), StaleHits: c.staleHits.Load(), Evictions: c.evictions.Load()}
}

// Prewarm fetches the profiles of many nodes, at most PrewarmConcurrency at a time,
// skipping those already fresh. It returns the failures joined, nil if none.
func (c *Cache) Prewarm(ctx context.Context, nodes []identity.NodeID) error {
	errs := make([]error, len(nodes))
	sem := make(chan struct{}, c.cfg.PrewarmConcurrency)
	var wg sync.WaitGroup
	for i, n := range nodes {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			errs[i] = ctx.Err()
			continue
		}
		wg.Go(func() {
			defer func() { <-sem }()
			_, errs[i] = c.Fetch(ctx, n)
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Close cancels background fetches and waits for them. It is idempotent; the cache
// still answers Get and Put afterwards, but fetches fail.
func (c *Cache) Close() error {
	// Under fmu, so no flight starts between the cancel and the Wait.
	c.fmu.Lock()
	c.cancel()
	c.fmu.Unlock()
	c.wg.Wait()
	return nil
}
