package signal_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"peerlink/identity"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// raw is a hand-driven client, for sending what the real client never would.
type raw struct {
	t     *testing.T
	ws    *websocket.Conn
	host  string
	nonce string
	id    *identity.Identity
}

func dialRaw(t *testing.T, srv *signaltest.Server) *raw {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, srv.URL, &websocket.DialOptions{Subprotocols: []string{signal.Subprotocol}})
	if err != nil {
		t.Fatal(err)
	}
	ws.SetReadLimit(1 << 20)
	t.Cleanup(func() { ws.CloseNow() })
	r := &raw{t: t, ws: ws, host: srv.Addr}
	f := r.read()
	if f.Type != signal.TypeChallenge {
		t.Fatalf("first frame %s, want challenge", f.Type)
	}
	var ch struct{ Nonce string }
	json.Unmarshal(f.Body, &ch)
	r.nonce = ch.Nonce
	return r
}

func (r *raw) send(b []byte) {
	r.t.Helper()
	if err := r.ws.Write(context.Background(), websocket.MessageText, b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// readErr reads the next frame, or returns the read error.
func (r *raw) readErr() (signal.Frame, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, b, err := r.ws.Read(ctx)
	if err != nil {
		return signal.Frame{}, err
	}
	return signal.ParseFrame(b)
}

func (r *raw) read() signal.Frame {
	r.t.Helper()
	f, err := r.readErr()
	if err != nil {
		r.t.Fatalf("read: %v", err)
	}
	return f
}

func (r *raw) authFrame(id *identity.Identity, host string) []byte {
	sig := id.Sign(signal.AuthSigningInput(host, r.nonce, id.NodeID()))
	return []byte(fmt.Sprintf(`{"id":1,"auth":{"nodeID":%q,"host":%q,"signature":%q}}`, id.NodeID(), host, hex.EncodeToString(sig)))
}

func (r *raw) auth() {
	r.t.Helper()
	r.id, _ = identity.Generate()
	r.send(r.authFrame(r.id, r.host))
	if f := r.read(); f.Type != signal.TypeWelcome {
		r.t.Fatalf("auth answered with %s %s", f.Type, f.Body)
	}
}

// expectError reads frames until an error frame and checks its code.
func (r *raw) expectError(code signal.Code) {
	r.t.Helper()
	for {
		f := r.read()
		if f.Type != signal.TypeError {
			continue
		}
		var e signal.Error
		json.Unmarshal(f.Body, &e)
		if e.Code != code {
			r.t.Fatalf("error %s (%s), want %s", e.Code, e.Message, code)
		}
		return
	}
}

// expectClosed reads until the connection ends and checks the close status and reason.
func (r *raw) expectClosed(status websocket.StatusCode, reason signal.Code) {
	r.t.Helper()
	for {
		_, err := r.readErr()
		if err == nil {
			continue
		}
		var ce websocket.CloseError
		if !errors.As(err, &ce) {
			r.t.Fatalf("connection ended with %v, want close status %d", err, status)
		}
		if ce.Code != status || (reason != "" && ce.Reason != string(reason)) {
			r.t.Fatalf("closed with %d %q, want %d %q", ce.Code, ce.Reason, status, reason)
		}
		return
	}
}

// alive checks the connection still answers requests.
func (r *raw) alive() {
	r.t.Helper()
	r.send([]byte(fmt.Sprintf(`{"id":77,"lookup":{"nodeID":%q}}`, r.id.NodeID())))
	for {
		f := r.read()
		if f.ID == 77 {
			if f.Type != signal.TypePeer {
				r.t.Fatalf("lookup answered with %s %s", f.Type, f.Body)
			}
			return
		}
	}
}

// signed builds a signed offer frame from r's identity to `to`, letting edit change the
// message after signing.
func (r *raw) signed(to identity.NodeID, edit func(m *signal.Message)) []byte {
	r.t.Helper()
	info := testInfo()
	m := &signal.Message{Type: signal.TypeOffer, To: to, Session: "bad-input", Info: &info}
	if err := m.Sign(r.id, time.Now()); err != nil {
		r.t.Fatal(err)
	}
	if edit != nil {
		edit(m)
	}
	b, err := m.AppendFrame(nil, 5)
	if err != nil {
		r.t.Fatal(err)
	}
	return b
}

func TestBadInput(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{MaxFrame: 4096}, false)
	target := srv.Dial(t, nil)
	other, _ := identity.Generate()

	tests := []struct {
		name string
		run  func(r *raw)
	}{
		{"malformed JSON", func(r *raw) {
			r.auth()
			r.send([]byte(`{"lookup":`))
			r.expectError(signal.CodeMalformed)
			r.alive()
		}},
		{"not an object", func(r *raw) {
			r.auth()
			r.send([]byte(`[1,2,3]`))
			r.expectError(signal.CodeMalformed)
			r.alive()
		}},
		{"two message types", func(r *raw) {
			r.auth()
			r.send([]byte(`{"lookup":{},"turn":{}}`))
			r.expectError(signal.CodeMalformed)
			r.alive()
		}},
		{"unknown type", func(r *raw) {
			r.auth()
			r.send([]byte(`{"id":3,"teleport":{}}`))
			r.expectError(signal.CodeUnsupported)
			r.alive()
		}},
		{"binary frame", func(r *raw) {
			r.auth()
			r.ws.Write(context.Background(), websocket.MessageBinary, []byte("{}"))
			r.expectError(signal.CodeMalformed)
			r.alive()
		}},
		{"oversized frame", func(r *raw) {
			r.auth()
			r.send([]byte(`{"lookup":{"nodeID":"` + strings.Repeat("a", 5000) + `"}}`))
			r.expectClosed(websocket.StatusMessageTooBig, "")
		}},
		{"request before auth", func(r *raw) {
			r.send([]byte(`{"id":2,"turn":{}}`))
			r.expectError(signal.CodeUnauthenticated)
		}},
		{"bad auth signature", func(r *raw) {
			id, _ := identity.Generate()
			f := r.authFrame(id, r.host)
			f = bytes.Replace(f, []byte(`"signature":"`), []byte(`"signature":"00`), 1)
			r.send(f)
			r.expectError(signal.CodeAuthFailed)
			r.expectClosed(websocket.StatusPolicyViolation, signal.CodeAuthFailed)
		}},
		{"auth as someone else", func(r *raw) {
			victim, _ := identity.Generate()
			attacker, _ := identity.Generate()
			sig := attacker.Sign(signal.AuthSigningInput(r.host, r.nonce, victim.NodeID()))
			r.send([]byte(fmt.Sprintf(`{"id":1,"auth":{"nodeID":%q,"host":%q,"signature":%q}}`, victim.NodeID(), r.host, hex.EncodeToString(sig))))
			r.expectClosed(websocket.StatusPolicyViolation, signal.CodeAuthFailed)
		}},
		{"auth signed for another server", func(r *raw) {
			id, _ := identity.Generate()
			r.send(r.authFrame(id, "evil.example:443"))
			r.expectClosed(websocket.StatusPolicyViolation, signal.CodeAuthFailed)
		}},
		{"spoofed sender", func(r *raw) {
			r.auth()
			impostor := r.id
			r.id = other // signs as other, over a connection authenticated as impostor
			f := r.signed(target.NodeID(), nil)
			r.id = impostor
			r.send(f)
			r.expectError(signal.CodeSpoofed)
			r.expectClosed(websocket.StatusPolicyViolation, signal.CodeSpoofed)
		}},
		{"bad signature", func(r *raw) {
			r.auth()
			r.send(r.signed(target.NodeID(), func(m *signal.Message) {
				m.Body = bytes.Replace(m.Body, []byte("203.0.113.7"), []byte("203.0.113.8"), 1)
			}))
			r.expectError(signal.CodeBadSignature)
			r.alive()
		}},
		{"missing signature", func(r *raw) {
			r.auth()
			f := r.signed(target.NodeID(), nil)
			i := bytes.Index(f, []byte(`,"signature"`))
			r.send(append(f[:i:i], "}}"...))
			r.expectError(signal.CodeBadSignature)
			r.alive()
		}},
		{"stale timestamp", func(r *raw) {
			r.auth()
			info := testInfo()
			m := &signal.Message{Type: signal.TypeOffer, To: target.NodeID(), Session: "old", Info: &info, Time: time.Now().Add(-10 * time.Minute)}
			m.Sign(r.id, time.Now())
			f, _ := m.AppendFrame(nil, 4)
			r.send(f)
			r.expectError(signal.CodeStale)
			r.alive()
		}},
		{"replay", func(r *raw) {
			r.auth()
			f := r.signed(target.NodeID(), nil)
			r.send(f)
			if a := r.read(); a.Type != signal.TypeOK {
				t.Fatalf("first send answered %s %s", a.Type, a.Body)
			}
			r.send(f)
			r.expectError(signal.CodeReplay)
			r.alive()
		}},
		{"offline target", func(r *raw) {
			r.auth()
			r.send(r.signed(other.NodeID(), nil))
			r.expectError(signal.CodePeerOffline)
			r.alive()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := dialRaw(t, srv)
			r.t = t
			tt.run(r)
		})
	}
	// Messages that passed the checks reached the target; nothing bad did.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	n := 0
	for {
		if _, err := target.Recv(ctx); err != nil {
			break
		}
		n++
	}
	if n != 1 || target.Stats().Rejected != 0 {
		t.Fatalf("target received %d messages (%d rejected), want exactly the one good offer", n, target.Stats().Rejected)
	}
}

// TestFlood: a connection that floods is answered rate_limited and then closed, and two
// other clients keep signaling meanwhile.
func TestFlood(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{RateLimit: 10, RateBurst: 20, MaxErrors: 10}, false)
	a, b := srv.Dial(t, nil), srv.Dial(t, nil)
	r := dialRaw(t, srv)
	r.auth()

	var wg sync.WaitGroup
	ctx, stop := context.WithCancel(context.Background())
	var exchanged atomic.Int32
	defer wg.Wait()
	defer stop()
	wg.Go(func() {
		info := testInfo()
		for i := 0; ctx.Err() == nil; i++ {
			if err := a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: b.NodeID(), Session: "s" + strconv.Itoa(i), Info: &info}); err != nil {
				if ctx.Err() == nil {
					t.Errorf("well-behaved send during flood: %v", err)
				}
				return
			}
			if _, err := b.Recv(ctx); err != nil {
				if ctx.Err() == nil {
					t.Errorf("well-behaved recv during flood: %v", err)
				}
				return
			}
			exchanged.Add(1)
			time.Sleep(20 * time.Millisecond) // stays within the rate limit
		}
	})
	for i := range 200 {
		if err := r.ws.Write(context.Background(), websocket.MessageText, []byte(fmt.Sprintf(`{"id":%d,"lookup":{"nodeID":%q}}`, i+10, r.id.NodeID()))); err != nil {
			break // closed by the server, as it should
		}
	}
	r.expectError(signal.CodeRateLimited)
	r.expectClosed(websocket.StatusPolicyViolation, signal.CodeTooManyErrors)
	time.Sleep(100 * time.Millisecond)
	stop()
	wg.Wait()
	if exchanged.Load() == 0 {
		t.Fatal("well-behaved clients exchanged nothing during the flood")
	}
	if st := srv.Stats(); st.Abusive != 1 || st.Authenticated != 2 {
		t.Fatalf("server stats %+v, want one abusive connection closed and two clients left", st)
	}
}

func TestAuthTimeoutAndLimits(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{AuthTimeout: 200 * time.Millisecond, MaxClients: 1}, false)
	r := dialRaw(t, srv)
	r.expectError(signal.CodeAuthTimeout)
	r.expectClosed(websocket.StatusPolicyViolation, signal.CodeAuthTimeout)

	srv.Dial(t, nil)
	id, _ := identity.Generate()
	_, err := signal.Dial(context.Background(), srv.URL, id, nil)
	if !errors.Is(err, signal.ErrServerFull) {
		t.Fatalf("dial over MaxClients = %v, want ErrServerFull", err)
	}
}

// TestHandWrittenFrame builds a frame the way a client in another language might —
// different spacing, field order and escapes — and checks it verifies end to end, since
// signatures cover the body bytes as sent.
func TestHandWrittenFrame(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	target := srv.Dial(t, nil)
	r := dialRaw(t, srv)
	r.auth()
	body := []byte(`{ "natType" : "symmetric",  "publicIP":"198.51.100.4", "publicPort": 4000, "note": "caf\u00e9 <ok>" }`)
	ts := time.Now().UnixMilli()
	nonce := "hand-written-nonce-0001"
	sig := r.id.Sign(signal.SigningInput(signal.TypeOffer, r.id.NodeID(), target.NodeID(), "hw", ts, nonce, body))
	frame := fmt.Sprintf(`{"offer": {"signature": "%x", "connectionInfo": %s, "nonce": %q, "timestamp": %d, "sessionID": "hw", "toNodeID": %q, "fromNodeID": %q}, "id": 9}`,
		sig, body, nonce, ts, target.NodeID(), r.id.NodeID())
	r.send([]byte(frame))
	if f := r.read(); f.Type != signal.TypeOK || f.ID != 9 {
		t.Fatalf("answered %s %s", f.Type, f.Body)
	}
	m := recv(t, target)
	if m.Info.NATType.String() != "symmetric" || m.Info.PublicPort != 4000 || !bytes.Equal(m.Body, body) {
		t.Fatalf("received %+v body %s", m.Info, m.Body)
	}
}
