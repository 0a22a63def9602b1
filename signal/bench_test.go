package signal

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"peerlink/identity"
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

// BenchmarkRouteCheck is the party check routing adds to every message, with the
// membership cache warm: sender and target in one party, and both in none.
func BenchmarkRouteCheck(b *testing.B) {
	srv, err := NewServer(Config{PingInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	for _, inParty := range []bool{false, true} {
		name := "no-party"
		if inParty {
			name = "shared-party"
		}
		b.Run(name, func(b *testing.B) {
			x, y := mustID(b), mustID(b)
			if inParty {
				ctx := context.Background()
				for _, id := range []*identity.Identity{x, y} {
					if err := srv.addMembership(ctx, id.NodeID(), "lan"); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportAllocs()
			for b.Loop() {
				if e := srv.checkShared(x.NodeID(), y.NodeID()); e != nil {
					b.Fatal(e)
				}
			}
		})
	}
}
