package natlab

import (
	"hash/fnv"
	"math/rand/v2"
	"time"
)

// Link is the behaviour of one hop: a NAT's uplink to its parent network, or a host's
// attachment to its network. It applies to packets in both directions. The zero value
// is a perfect link: no delay, no loss.
type Link struct {
	// Latency delays every packet crossing the link.
	Latency time.Duration
	// Jitter adds a uniformly random extra delay in [0, Jitter] to each packet, so
	// packets may overtake each other.
	Jitter time.Duration
	// Loss is the probability, from 0 to 1, that a packet crossing the link is dropped.
	Loss float64
}

// link is a Link with its own random stream, so one link's traffic never shifts
// another's losses.
type link struct {
	Link
	rng *rand.Rand
}

// lose reports whether the next packet is lost.
func (l *link) lose() bool {
	return l.Loss > 0 && (l.Loss >= 1 || l.rng.Float64() < l.Loss)
}

// delay returns how long the next packet takes to cross.
func (l *link) delay() time.Duration {
	d := max(l.Latency, 0)
	if l.Jitter > 0 {
		d += time.Duration(l.rng.Int64N(int64(l.Jitter) + 1))
	}
	return d
}

// newRand returns the generator for one purpose of one element: seeded by the network
// seed and a label naming both, so streams are independent of creation order.
func newRand(seed uint64, label string) *rand.Rand {
	h := fnv.New64a()
	h.Write([]byte(label))
	return rand.New(rand.NewPCG(seed, h.Sum64()))
}
