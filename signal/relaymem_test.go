package signal_test

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"testing"
	"time"

	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestRelaySlowReceiver: a receiver that reads far slower than its peer sends costs the
// server no more than its queue limit: the excess is dropped and counted, and the
// server's heap stays flat while hundreds of megabytes are offered.
func TestRelaySlowReceiver(t *testing.T) {
	const nodeQueue = 256 << 10
	srv := signaltest.Start(t, signal.Config{PingInterval: -1, Relay: signal.RelayConfig{Rate: -1, NodeQueue: nodeQueue, SessionQueue: nodeQueue}}, false)
	a := srv.Dial(t, nil)
	slow := &rawRelay{dialRaw(t, srv)}
	slow.auth()

	opened := make(chan *signal.RelayConn, 1)
	go func() {
		rc, err := a.OpenRelay(ctxT(t), slow.id.NodeID())
		if err != nil {
			t.Errorf("OpenRelay: %v", err)
		}
		opened <- rc
	}()
	var in struct{ Session uint32 }
	json.Unmarshal(slow.expect(signal.TypeRelayIncoming), &in)
	slow.send([]byte(fmt.Sprintf(`{"id":3,"relayReady":{"session":%d}}`, in.Session)))
	ra := <-opened
	if ra == nil {
		t.FailNow()
	}

	// The slow receiver reads one message every 20 ms: under 1 MB/s.
	ctx, cancel := context.WithCancel(context.Background())
	readerDone := make(chan int)
	go func() {
		n := 0
		for ctx.Err() == nil {
			_, b, err := slow.ws.Read(ctx)
			if err != nil {
				break
			}
			n += len(b)
			time.Sleep(20 * time.Millisecond)
		}
		readerDone <- n
	}()

	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	base := heap()
	var peakHeap uint64
	p := make([]byte, 1200)
	start := time.Now()
	next := start
	for time.Since(start) < 2*time.Second {
		for range 200 {
			ra.Send(p)
		}
		if time.Now().After(next) {
			peakHeap = max(peakHeap, heap())
			next = time.Now().Add(200 * time.Millisecond)
		}
		runtime.Gosched()
	}
	st := srv.RelayStats()
	sent := ra.Stats()
	cancel()
	got := <-readerDone
	growth := int64(peakHeap) - int64(base)
	t.Logf("offered %d MB (%d datagrams, %d dropped by the client), server forwarded %d, dropped %d at the full queue; receiver read %d KB; server queue peak %d KB (limit %d KB); heap growth %d KB",
		sent.SentBytes>>20, sent.Sent, sent.SendDropped, st.Forwarded, st.QueueDropped, got>>10, st.QueuedPeak>>10, nodeQueue>>10, growth>>10)
	if st.QueuedPeak > nodeQueue {
		t.Fatalf("server queued %d bytes, over the %d limit", st.QueuedPeak, nodeQueue)
	}
	if st.QueueDropped == 0 {
		t.Fatal("nothing dropped for the slow receiver")
	}
	if sent.SentBytes < 4<<20 {
		t.Fatalf("only %d bytes offered: the test did not push hard", sent.SentBytes)
	}
	// Client queues, the server's queue and buffers: about a megabyte, against the many
	// of megabytes offered.
	if growth > 4<<20 {
		t.Fatalf("heap grew by %d KB while the receiver was slow", growth>>10)
	}
}
