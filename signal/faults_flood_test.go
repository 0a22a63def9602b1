package signal_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// signalRTTs measures a well-behaved pair of clients: n offers from a to b, each timed
// from Send until b has it. Failures are counted, not fatal: they are what is measured.
func signalRTTs(a, b *signal.Client, n int) (rtt []time.Duration, failed int) {
	info := testInfo()
	for i := range n {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		start := time.Now()
		err := a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: b.NodeID(), Session: fmt.Sprintf("good-%d", i), Info: &info})
		if err == nil {
			_, err = b.Recv(ctx)
		}
		cancel()
		if err != nil {
			failed++
			continue
		}
		rtt = append(rtt, time.Since(start))
	}
	return rtt, failed
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// TestSignalingFloodLatency measures a good pair of clients' signaling latency before
// and during floods of the rendezvous server: authenticated connections sending lookups
// as fast as they can, and connections sending frames over the size limit. The good
// clients keep service (p99 under a generous bound, nothing lost), the flooders are
// answered rate_limited and closed, and the oversized frames close their connections
// with 1009.
func TestSignalingFloodLatency(t *testing.T) {
	const bound = 2 * time.Second // p99 under the floods, race detector included, on two cores shared with the flooders
	srv := signaltest.Start(t, signal.Config{RateLimit: 200, RateBurst: 200}, false)
	a, b := srv.Dial(t, nil), srv.Dial(t, nil)
	before, beforeFailed := signalRTTs(a, b, 150)

	const flooders = 8
	raws := make([]*raw, flooders)
	for i := range raws {
		raws[i] = dialRaw(t, srv)
		raws[i].auth()
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sent, rateLimited, abuseClosed, tooBig, oversized atomic.Int64
	for _, r := range raws {
		// The reader: what the server answers and how it ends the connection.
		wg.Go(func() {
			for {
				_, data, err := r.ws.Read(context.Background())
				if err != nil {
					if websocket.CloseStatus(err) == websocket.StatusPolicyViolation {
						abuseClosed.Add(1)
					}
					return
				}
				if strings.Contains(string(data), string(signal.CodeRateLimited)) {
					rateLimited.Add(1)
				}
			}
		})
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					r.ws.CloseNow()
					return
				default:
				}
				frame := fmt.Sprintf(`{"id":%d,"lookup":{"nodeID":%q}}`, i+10, r.id.NodeID())
				if r.ws.Write(context.Background(), websocket.MessageText, []byte(frame)) != nil {
					return // closed by the server
				}
				sent.Add(1)
			}
		})
	}
	// Oversized frames, each on a new connection, before authenticating.
	big := make([]byte, 64<<10)
	for i := range big {
		big[i] = 'x'
	}
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				ws, _, err := websocket.Dial(ctx, srv.URL, &websocket.DialOptions{Subprotocols: []string{signal.Subprotocol}})
				if err != nil {
					cancel()
					continue
				}
				oversized.Add(1)
				ws.Write(ctx, websocket.MessageText, big)
				for {
					if _, _, err := ws.Read(ctx); err != nil {
						if websocket.CloseStatus(err) == websocket.StatusMessageTooBig {
							tooBig.Add(1)
						}
						break
					}
				}
				ws.CloseNow()
				cancel()
			}
		})
	}
	time.Sleep(100 * time.Millisecond)
	during, duringFailed := signalRTTs(a, b, 150)
	close(stop)
	wg.Wait()
	st := srv.Stats()
	t.Logf("good clients' offer a → b: before p50 %v p99 %v (%d failed); during the floods p50 %v p99 %v (%d failed)",
		pct(before, 0.5), pct(before, 0.99), beforeFailed, pct(during, 0.5), pct(during, 0.99), duringFailed)
	t.Logf("floods: %d lookups sent by %d connections, %d answered rate_limited, %d connections closed for abuse; %d oversized frames, %d closed 1009; server %+v",
		sent.Load(), flooders, rateLimited.Load(), abuseClosed.Load(), oversized.Load(), tooBig.Load(), st)
	if duringFailed > 0 || pct(during, 0.99) > bound {
		t.Errorf("good clients during the floods: %d failed, p99 %v; want none failed and p99 < %v", duringFailed, pct(during, 0.99), bound)
	}
	if rateLimited.Load() == 0 || abuseClosed.Load() != flooders {
		t.Errorf("flooders: %d rate_limited answers, %d of %d closed for abuse; want rate limiting and every flooder closed", rateLimited.Load(), abuseClosed.Load(), flooders)
	}
	if oversized.Load() == 0 || tooBig.Load() != oversized.Load() {
		t.Errorf("oversized frames: %d sent, %d connections closed with 1009; want every one closed", oversized.Load(), tooBig.Load())
	}
	if errors.Is(a.Err(), signal.ErrClosed) || errors.Is(b.Err(), signal.ErrClosed) {
		t.Error("a good client was disconnected")
	}
}
