package signal

import (
	"sync"
	"time"

	"peerlink/identity"
)

// ReplayGuard remembers the (sender, nonce) pairs of accepted messages for as long as
// their timestamps could pass Verify, so a message delivered twice is caught. Memory is
// bounded: when full it refuses new messages (fail closed) until old entries age out.
//
// It keeps two generations of entries and starts a new one every 2×skew: a message with
// an acceptable timestamp can only be replayed within 2×skew of its first acceptance,
// so every entry lives at least that long.
type ReplayGuard struct {
	skew time.Duration
	max  int

	mu        sync.Mutex
	cur, prev map[replayKey]struct{}
	started   time.Time
}

type replayKey struct {
	from  identity.NodeID
	nonce string
}

// NewReplayGuard returns a guard for messages verified with skew, holding at most max
// entries (zero means 100,000, about 10 MB).
func NewReplayGuard(skew time.Duration, max int) *ReplayGuard {
	if max <= 0 {
		max = 100_000
	}
	return &ReplayGuard{skew: skew, max: max, cur: map[replayKey]struct{}{}, prev: map[replayKey]struct{}{}}
}

// Check records (from, nonce) and returns nil the first time, an *Error with code replay
// after that, or one with code overloaded when the guard is full.
func (g *ReplayGuard) Check(from identity.NodeID, nonce string, now time.Time) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.started.IsZero() {
		g.started = now
	}
	if age := now.Sub(g.started); age >= 2*g.skew {
		g.prev, g.cur, g.started = g.cur, map[replayKey]struct{}{}, now
		if age >= 4*g.skew {
			g.prev = map[replayKey]struct{}{} // both generations are too old
		}
	}
	k := replayKey{from, nonce}
	if _, ok := g.cur[k]; ok {
		return errorf(CodeReplay, "nonce %s from %s seen before", nonce, from.Short())
	}
	if _, ok := g.prev[k]; ok {
		return errorf(CodeReplay, "nonce %s from %s seen before", nonce, from.Short())
	}
	if len(g.cur)+len(g.prev) >= g.max {
		return errorf(CodeOverloaded, "replay guard full (%d entries)", g.max)
	}
	g.cur[k] = struct{}{}
	return nil
}

// Len returns the number of remembered entries.
func (g *ReplayGuard) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.cur) + len(g.prev)
}
