package signal_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/store/natsstore"
	"peerlink/store/natsstore/natstest"
)

// BenchmarkRelay measures the relay's throughput: 1200-byte datagrams (QUIC's usual
// size) from one client to another over loopback, through one server or through two
// servers joined by NATS, with no bandwidth limit. The sender keeps a window in flight
// and retries datagrams its own full queue dropped; MB/s is what the receiver got,
// loss% what was lost on the way.
func BenchmarkRelay(b *testing.B) {
	cfg := signal.Config{PingInterval: -1, Relay: signal.RelayConfig{Rate: -1, NodeQueue: 1 << 20, SessionQueue: 1 << 20}}
	b.Run("one-server", func(b *testing.B) {
		srv := signaltest.Start(b, cfg, false)
		benchRelay(b, srv.Dial(b, nil), srv.Dial(b, nil))
	})
	b.Run("two-servers-nats", func(b *testing.B) {
		ns := natstest.Start(b)
		var srv [2]*signaltest.Server
		for i := range srv {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			st, err := natsstore.New(ctx, natsstore.Config{URL: ns.ClientURL()})
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { st.Close() })
			c := cfg
			c.Store = st
			srv[i] = signaltest.Start(b, c, false)
		}
		benchRelay(b, srv[0].Dial(b, nil), srv[1].Dial(b, nil))
	})
}

// window is how many datagrams the benchmark keeps in flight: 384 KB, under the client's send queue and the
// 1 MiB queues the benchmark gives the server.
const window = 320

func benchRelay(b *testing.B, a, c *signal.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	acc := make(chan *signal.RelayConn, 1)
	go func() {
		rc, _ := c.AcceptRelay(ctx)
		acc <- rc
	}()
	var ra *signal.RelayConn
	for {
		var err error
		if ra, err = a.OpenRelay(ctx, c.NodeID()); err == nil {
			break
		}
		if ctx.Err() != nil {
			b.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // across NATS, c's subject takes a moment
	}
	rc := <-acc
	defer ra.Close()
	defer rc.Close()
	var last atomic.Int64 // when the last datagram arrived
	got := make(chan uint64)
	go func() {
		var n uint64
		for {
			p, err := rc.Recv(ctx)
			if err != nil {
				break
			}
			n += uint64(len(p))
			last.Store(time.Now().UnixNano())
		}
		got <- n
	}()
	p := make([]byte, 1200)
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	start := time.Now()
	var forgiven uint64 // datagrams lost on the way, no longer counted in flight
	inFlight := func() uint64 { return ra.Stats().Sent - rc.Stats().Received - forgiven }
	for i := 0; i < b.N; i++ {
		// A window of datagrams in flight, under the queues on the way, stands in for
		// QUIC's congestion control.
		for waited := time.Now(); inFlight() >= window && ctx.Err() == nil; {
			time.Sleep(20 * time.Microsecond)
			if time.Since(waited) > 20*time.Millisecond {
				forgiven = ra.Stats().Sent - rc.Stats().Received
			}
		}
		for d := ra.Stats().SendDropped; ; time.Sleep(20 * time.Microsecond) {
			ra.Send(p) // dropped while the client's queue is full: again
			if ra.Stats().SendDropped == d {
				break
			}
			d++
		}
	}
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		if rc.Stats().Received+rc.Stats().RecvDropped >= uint64(b.N) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	elapsed := time.Unix(0, last.Load()).Sub(start)
	rc.Close()
	n := <-got
	b.ReportMetric(float64(n)/elapsed.Seconds()/1e6, "MB/s-received")
	b.ReportMetric(100*(1-float64(n)/float64(b.N*len(p))), "loss%")
}
