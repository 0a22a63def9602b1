// Package ratelimit keeps per-source token buckets in a table of fixed size, so that no
// number of sources can grow the memory of the peerlink server that limits them.
package ratelimit

import (
	"crypto/rand"
	"encoding/binary"
	"math/bits"
	"net/netip"
	"sync"
)

// Sources are IPv4 addresses and IPv6 /64 prefixes: one IPv6 host usually owns a whole
// /64, so limiting single IPv6 addresses would limit nothing.

const (
	ways  = 8   // entries a source may occupy: one set of a set-associative table
	locks = 256 // lock stripes
)

// Table is a fixed-size set-associative table of token buckets, one per source. Its
// memory (32 bytes a source) is allocated once by New and never grows: when a set is
// full, a new source takes the place of the least recently seen of the eight it
// competes with, and starts with a full bucket. It is safe for concurrent use.
type Table struct {
	rate  float64 // tokens per nanosecond
	burst float64
	sets  []set
	mask  uint64
	seed  [2]uint64
	locks [locks]struct {
		sync.Mutex
		_ [56]byte // one lock per cache line: loops on other cores do not share lines
	}
}

type set [ways]entry

type entry struct {
	k0, k1 uint64
	seen   int64 // the caller's time in nanoseconds, plus one; zero means free
	tokens float64
}

// New returns a table for at least maxSources sources (rounded up to a power of two),
// each earning rate tokens per second up to burst.
func New(rate, burst float64, maxSources int) *Table {
	nsets := max(1, (maxSources+ways-1)/ways)
	nsets = 1 << bits.Len(uint(nsets-1)) // round up to a power of two
	t := &Table{
		rate:  rate / 1e9,
		burst: burst,
		sets:  make([]set, nsets),
		mask:  uint64(nsets - 1),
	}
	// A secret seed keeps senders from aiming their addresses at one set.
	var b [16]byte
	rand.Read(b[:])
	t.seed = [2]uint64{binary.LittleEndian.Uint64(b[:8]), binary.LittleEndian.Uint64(b[8:])}
	return t
}

// Capacity is the number of sources the table holds.
func (t *Table) Capacity() int { return len(t.sets) * ways }

// Key folds an address to the source it belongs to: the IPv4 address, or the IPv6 /64.
// Two addresses of one source have the same key.
func Key(a netip.Addr) (k0, k1 uint64) {
	a = a.Unmap()
	if a.Is4() {
		b := a.As4()
		return 0, uint64(binary.BigEndian.Uint32(b[:]))
	}
	if !a.Is6() {
		return 0, 1 << 62 // the zero Addr: a source of its own rather than a panic
	}
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8]), 1 << 63
}

func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// Allow takes cost tokens from src's bucket at time now (nanoseconds on any clock that
// does not go back) and reports whether it had them. It does not allocate.
func (t *Table) Allow(src netip.Addr, cost float64, now int64) bool {
	k0, k1 := Key(src)
	idx := mix(mix(k0^t.seed[0])^k1^t.seed[1]) & t.mask
	stamp := now + 1
	mu := &t.locks[idx%locks]
	mu.Lock()
	s := &t.sets[idx]
	victim := &s[0]
	for i := range s {
		e := &s[i]
		if e.seen != 0 && e.k0 == k0 && e.k1 == k1 {
			if d := stamp - e.seen; d > 0 {
				e.tokens = min(t.burst, e.tokens+float64(d)*t.rate)
				e.seen = stamp
			}
			ok := e.tokens >= cost
			if ok {
				e.tokens -= cost
			}
			mu.Unlock()
			return ok
		}
		if e.seen < victim.seen {
			victim = e
		}
	}
	ok := t.burst >= cost
	tokens := t.burst
	if ok {
		tokens -= cost
	}
	*victim = entry{k0: k0, k1: k1, seen: stamp, tokens: tokens}
	mu.Unlock()
	return ok
}
