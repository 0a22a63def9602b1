package stun

import (
	"net/netip"
	"testing"
)

// BenchmarkHandle measures the handler alone: decoding, checks, the rate limiter and
// encoding the answer. It must not allocate.
func BenchmarkHandle(b *testing.B) {
	for _, bc := range []struct {
		name string
		msg  []byte
		opts handlerOpts
	}{
		{"binding", request().fpOn().bytes(), handlerOpts{single: true, software: "peerlink"}},
		{"rfc5780-change", request().change(ChangeIP | ChangePort).fpOn().bytes(), handlerOpts{software: "peerlink"}},
		{"classic", request().classicOn().change(ChangePort).bytes(), handlerOpts{}},
		{"unknown-420", request().attr(0x7777, nil).bytes(), handlerOpts{}},
		{"not-stun", []byte("GET / HTTP/1.1\r\nHost: stun\r\n\r\n"), handlerOpts{}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			bc.opts.rateLimit = RateLimit{Rate: 1e12, Burst: 1e12}
			w := newTestWorker(bc.opts)
			resp := newResponse()
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.msg)))
			i := 0
			for b.Loop() {
				i++
				// Spread the sources over the limiter as real traffic does.
				src := netip.AddrPortFrom(addr4(uint32(i&1023)+1<<24), 40000)
				w.handle(bc.msg, src, 0, false, int64(i), resp)
			}
		})
	}
}
