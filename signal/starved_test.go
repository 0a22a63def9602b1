package signal_test

import (
	"sync/atomic"
	"testing"
	"time"

	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestStarvedWriterKeepsClient is issue 4 at small scale. With 10,000 clients on two
// cores a connection's writer goroutine could wait longer than WriteTimeout for a CPU
// around a write; the write's timeout then fired and the WebSocket library closed the
// connection even though its bytes went out and the client read everything. A client that
// reads promptly must stay connected however long the server itself takes.
func TestStarvedWriterKeepsClient(t *testing.T) {
	const writeTimeout = 100 * time.Millisecond
	var stall atomic.Bool
	restore := signal.SetWriterStall(func() {
		if stall.Load() {
			time.Sleep(3 * writeTimeout) // the scheduler's delay, not the client's
		}
	})
	defer restore()
	srv := signaltest.Start(t, signal.Config{WriteTimeout: writeTimeout, PingInterval: -1}, false)
	a, b := srv.Dial(t, nil), srv.Dial(t, nil)
	defer a.Close()
	defer b.Close()

	stall.Store(true)
	for i := range 3 {
		msg := &signal.Message{Type: signal.TypeBye, To: b.NodeID(), Session: signal.NewNonce()}
		if err := a.Send(ctxT(t), msg); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		if m := recv(t, b); m.Session != msg.Session {
			t.Fatalf("message %d: got session %s, want %s", i, m.Session, msg.Session)
		}
	}
	stall.Store(false)
	exchange(t, a, b)
	if st := srv.Stats(); st.Authenticated != 2 || st.Abusive != 0 {
		t.Fatalf("after stalled writes: %+v, want both clients still connected", st)
	}
}
