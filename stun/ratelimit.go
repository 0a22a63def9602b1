package stun

import (
	"crypto/rand"
	"encoding/binary"
	"math/bits"
	"net/netip"
	"sync"
)

// RateLimit configures the per-source token buckets that keep the server from being used
// as a traffic amplifier. Sources are IPv4 addresses and IPv6 /64 prefixes (one IPv6 host
// usually owns a whole /64). Every zero field means its default.
type RateLimit struct {
	// Disabled turns the limiter off, for benchmarks and trusted networks.
	Disabled bool
	// Rate is the sustained number of tokens per second a source earns; 0 means 50.
	Rate float64
	// Burst is the bucket size; 0 means 100.
	Burst float64
	// ChangeCost is what an honoured CHANGE-REQUEST costs; every other answer costs one
	// token. CHANGE-REQUEST is the amplification vector: its answer comes from an address
	// the client did not send to. 0 means 5.
	ChangeCost float64
	// MaxSources bounds the sources tracked at once, and so the limiter's memory (32
	// bytes a source, allocated once). When full, a new source takes the place of the
	// least recently seen of the eight it competes with. 0 means 65536.
	MaxSources int
}

// Defaults for RateLimit's zero fields.
const (
	DefaultRate       = 50
	DefaultBurst      = 100
	DefaultChangeCost = 5
	DefaultMaxSources = 65536
)

func (r RateLimit) withDefaults() RateLimit {
	if r.Rate == 0 {
		r.Rate = DefaultRate
	}
	if r.Burst == 0 {
		r.Burst = DefaultBurst
	}
	if r.ChangeCost == 0 {
		r.ChangeCost = DefaultChangeCost
	}
	if r.MaxSources == 0 {
		r.MaxSources = DefaultMaxSources
	}
	return r
}

const (
	limiterWays  = 8   // entries a source may occupy: one set of a set-associative table
	limiterLocks = 256 // lock stripes
)

// limiter is a fixed-size set-associative table of token buckets. Its memory never grows
// after construction, whatever the number of sources.
type limiter struct {
	rate  float64 // tokens per nanosecond
	burst float64
	sets  []limiterSet
	mask  uint64
	seed  [2]uint64
	locks [limiterLocks]struct {
		sync.Mutex
		_ [56]byte
	}
}

type limiterSet [limiterWays]limiterEntry

type limiterEntry struct {
	k0, k1 uint64
	seen   int64 // nanoseconds since the server's epoch, plus one; zero means free
	tokens float64
}

func newLimiter(r RateLimit) *limiter {
	nsets := (r.MaxSources + limiterWays - 1) / limiterWays
	nsets = 1 << bits.Len(uint(nsets-1)) // round up to a power of two
	l := &limiter{
		rate:  r.Rate / 1e9,
		burst: r.Burst,
		sets:  make([]limiterSet, nsets),
		mask:  uint64(nsets - 1),
	}
	// A secret seed keeps senders from aiming their addresses at one set.
	var b [16]byte
	rand.Read(b[:])
	l.seed = [2]uint64{binary.LittleEndian.Uint64(b[:8]), binary.LittleEndian.Uint64(b[8:])}
	return l
}

// capacity is the number of sources the table holds.
func (l *limiter) capacity() int { return len(l.sets) * limiterWays }

// sourceKey folds an address to its limiter key: the IPv4 address, or the IPv6 /64.
func sourceKey(a netip.Addr) (k0, k1 uint64) {
	a = a.Unmap()
	if a.Is4() {
		b := a.As4()
		return 0, uint64(binary.BigEndian.Uint32(b[:]))
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

// allow takes cost tokens from src's bucket at time now (nanoseconds) and reports whether
// it had them.
func (l *limiter) allow(src netip.Addr, cost float64, now int64) bool {
	k0, k1 := sourceKey(src)
	idx := mix(mix(k0^l.seed[0])^k1^l.seed[1]) & l.mask
	stamp := now + 1
	mu := &l.locks[idx%limiterLocks]
	mu.Lock()
	set := &l.sets[idx]
	victim := &set[0]
	for i := range set {
		e := &set[i]
		if e.seen != 0 && e.k0 == k0 && e.k1 == k1 {
			if d := stamp - e.seen; d > 0 {
				e.tokens = min(l.burst, e.tokens+float64(d)*l.rate)
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
	// A new source starts with a full bucket, in the place of the least recently seen.
	ok := l.burst >= cost
	tokens := l.burst
	if ok {
		tokens -= cost
	}
	*victim = limiterEntry{k0: k0, k1: k1, seen: stamp, tokens: tokens}
	mu.Unlock()
	return ok
}
