package relay

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v3"
)

// BenchmarkHandle measures the control path alone, in process, with the per-source
// request limit off and on: what the limit adds to each request, and what a request it
// drops costs.
func BenchmarkHandle(b *testing.B) {
	binding := stun.MustBuild(stun.TransactionID, stun.BindingRequest, stun.Fingerprint).Raw
	unauth := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest),
		rawAttr{stun.AttrRequestedTransport, []byte{17, 0, 0, 0}}, stun.Fingerprint).Raw
	never := RequestLimit{Rate: 1e15, Burst: 1e15} // on, but never refusing
	tests := []struct {
		name   string
		limit  RequestLimit
		req    []byte
		answer bool
	}{
		{"binding/limit off", RequestLimit{Disabled: true}, binding, true},
		{"binding/limit on", never, binding, true},
		{"401/limit off", RequestLimit{Disabled: true}, unauth, true},
		{"401/limit on", never, unauth, true},
		{"401/over the limit", RequestLimit{Rate: 1e-9, Burst: 2}, unauth, false},
	}
	for _, tt := range tests {
		b.Run(tt.name, func(b *testing.B) {
			s, err := New(Config{ListenUDP: "127.0.0.1:0", Users: map[string]string{"u": "p"}, RequestLimit: tt.limit})
			if err != nil {
				b.Fatal(err)
			}
			l, err := newLoop(s)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(l.closeFDs)
			rc := &reqCtx{transport: UDP, loop: l, now: time.Now()}
			// Sources spread over the limiter's table, as real traffic is, except when
			// the one source is over its limit.
			var srcs [1024]netip.AddrPort
			for i := range srcs {
				srcs[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 5000)
			}
			s.handle(&reqCtx{transport: UDP, loop: l, now: rc.now, client: srcs[0]}, tt.req)
			s.handle(&reqCtx{transport: UDP, loop: l, now: rc.now, client: srcs[0]}, tt.req)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if tt.answer {
					rc.client = srcs[i&1023]
				} else {
					rc.client = srcs[0]
				}
				i++
				if got := s.handle(rc, tt.req) != nil; got != tt.answer {
					b.Fatalf("answered %v, want %v", got, tt.answer)
				}
			}
		})
	}
}
