package stun

import (
	"net/netip"
	"testing"
)

func addr4(i uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
}

// TestLimiterConfig checks that RateLimit's zero fields become the documented defaults
// and that the table the server builds holds MaxSources. The table itself is tested in
// internal/ratelimit.
func TestLimiterConfig(t *testing.T) {
	for _, tt := range []struct {
		in   RateLimit
		want RateLimit
		cap  int
	}{
		{RateLimit{}, RateLimit{Rate: DefaultRate, Burst: DefaultBurst, ChangeCost: DefaultChangeCost, MaxSources: DefaultMaxSources}, DefaultMaxSources},
		{RateLimit{Rate: 1, Burst: 2, ChangeCost: 3, MaxSources: 1000}, RateLimit{Rate: 1, Burst: 2, ChangeCost: 3, MaxSources: 1000}, 1024},
	} {
		got := tt.in.withDefaults()
		if got != tt.want {
			t.Errorf("%+v.withDefaults() = %+v, want %+v", tt.in, got, tt.want)
		}
		l := newLimiter(got)
		if c := l.Capacity(); c != tt.cap {
			t.Errorf("capacity %d for %+v, want %d", c, got, tt.cap)
		}
		a := addr4(1)
		n := 0
		for l.Allow(a, 1, 0) {
			n++
		}
		if n != int(got.Burst) {
			t.Errorf("%d requests allowed at once, want the burst %v", n, got.Burst)
		}
	}
}
