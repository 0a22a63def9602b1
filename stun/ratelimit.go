package stun

import "peerlink/internal/ratelimit"

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

// newLimiter is the per-source table for r: 32 bytes a source, allocated once.
func newLimiter(r RateLimit) *ratelimit.Table {
	return ratelimit.New(r.Rate, r.Burst, r.MaxSources)
}
