package signal_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/coder/websocket"

	"peerlink/identity"
	"peerlink/signal"
)

// TestHostileServer: a rendezvous server that forges, alters, misdirects, delays and
// replays messages gets none of them past the receiving client.
func TestHostileServer(t *testing.T) {
	alice, _ := identity.Generate()
	bob, _ := identity.Generate()
	mallory, _ := identity.Generate()
	info := testInfo()
	now := time.Now()
	offer := func(from *identity.Identity, to identity.NodeID, at time.Time, edit func(m *signal.Message)) []byte {
		m := &signal.Message{Type: signal.TypeOffer, To: to, Session: "hostile", Info: &info, Time: at}
		if err := m.Sign(from, now); err != nil {
			t.Fatal(err)
		}
		if edit != nil {
			edit(m)
		}
		f, err := m.AppendFrame(nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	good := offer(alice, bob.NodeID(), now, nil)
	inject := [][]byte{
		// Signed by mallory but claiming to be from alice.
		offer(mallory, bob.NodeID(), now, func(m *signal.Message) { m.From = alice.NodeID() }),
		// Alice's message with its body altered.
		offer(alice, bob.NodeID(), now, func(m *signal.Message) {
			m.Body = bytes.Replace(m.Body, []byte(`"natType":"portRestricted"`), []byte(`"natType":"fullCone"`), 1)
		}),
		// Alice's message to someone else, redirected to bob.
		offer(alice, mallory.NodeID(), now, nil),
		// Alice's message from long ago.
		offer(alice, bob.NodeID(), now.Add(-time.Hour), nil),
		// A bad signature encoding.
		bytes.Replace(good, []byte(`"signature":"`), []byte(`"signature":"zz`), 1),
		good,
		good, // replayed
	}

	served := make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{signal.Subprotocol}})
		if err != nil {
			return
		}
		defer ws.CloseNow()
		ctx := context.Background()
		ws.Write(ctx, websocket.MessageText, []byte(`{"challenge":{"nonce":"abcdefghijklmnopqrstuvwx","serverTime":0}}`))
		if _, _, err := ws.Read(ctx); err != nil {
			return
		}
		ws.Write(ctx, websocket.MessageText, fmt.Appendf(nil, `{"id":1,"welcome":{"nodeID":%q}}`, bob.NodeID()))
		for _, f := range inject {
			ws.Write(ctx, websocket.MessageText, f)
		}
		<-served
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: h}
	go hs.Serve(ln)
	defer hs.Close()

	c, err := signal.Dial(context.Background(), "ws://"+ln.Addr().String(), bob, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	defer close(served) // before c.Close, so the hostile server hangs up and Close is quick
	m := recv(t, c)
	if m.From != alice.NodeID() || m.Info.NATType != info.NATType {
		t.Fatalf("first message accepted: from %s natType %s, want alice's genuine offer", m.From.Short(), m.Info.NATType)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if extra, err := c.Recv(ctx); err == nil {
		t.Fatalf("a second message got through: %+v", extra)
	}
	if st := c.Stats(); st.Received != 1 || st.Rejected != 6 {
		t.Fatalf("client stats %+v, want 1 received and 6 rejected", st)
	}
}
