package signal

import (
	"net/netip"
	"testing"
	"time"
)

// BenchmarkServerDecode is the server's per-message parsing: frame, then envelope.
func BenchmarkServerDecode(b *testing.B) {
	a, to := mustID(b), mustID(b)
	c := Candidate{Type: CandidateSrflx, IP: netip.MustParseAddr("203.0.113.50"), Port: 40000, Priority: CandidatePriority(CandidateSrflx, 65535)}
	m := &Message{Type: TypeCandidate, To: to.NodeID(), Session: "load", Candidate: &c}
	if err := m.Sign(a, time.Now()); err != nil {
		b.Fatal(err)
	}
	frame, _ := m.AppendFrame(nil, 12345)
	b.ReportAllocs()
	for b.Loop() {
		f, err := ParseFrame(frame)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := decodeEnvelope(f.Type, f.Body); err != nil {
			b.Fatal(err)
		}
	}
}
