package signal_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/coder/websocket"

	"peerlink/identity"
	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/store/memstore"
)

// relayPair opens a relay session from a to b and returns both ends.
func relayPair(t *testing.T, a, b *signal.Client, tag string) (*signal.RelayConn, *signal.RelayConn) {
	t.Helper()
	ctx := ctxT(t)
	type res struct {
		rc  *signal.RelayConn
		err error
	}
	acc := make(chan res, 1)
	go func() {
		rc, err := b.AcceptRelay(ctx)
		acc <- res{rc, err}
	}()
	ra, err := a.OpenRelayTag(ctx, b.NodeID(), tag)
	if err != nil {
		t.Fatalf("OpenRelay: %v", err)
	}
	r := <-acc
	if r.err != nil {
		t.Fatalf("AcceptRelay: %v", r.err)
	}
	t.Cleanup(func() { ra.Close(); r.rc.Close() })
	return ra, r.rc
}

// pingPong checks datagrams cross both ways intact.
func pingPong(t *testing.T, ra, rb *signal.RelayConn, n int) {
	t.Helper()
	ctx := ctxT(t)
	for i := range n {
		msg := []byte(fmt.Sprintf("ping %d %s", i, bytes.Repeat([]byte{'x'}, i*37%1300)))
		if err := ra.Send(msg); err != nil {
			t.Fatal(err)
		}
		got, err := rb.Recv(ctx)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("b got %q, %v; want %q", got, err, msg)
		}
		reply := append([]byte("pong "), msg...)
		if _, err := rb.WriteTo(reply, rb.RemoteAddr()); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2048)
		k, from, err := ra.ReadFrom(buf)
		if err != nil || !bytes.Equal(buf[:k], reply) {
			t.Fatalf("a got %q, %v", buf[:k], err)
		}
		if from.(signal.RelayAddr).Node != rb.LocalAddr().(signal.RelayAddr).Node {
			t.Fatalf("a's datagram came from %v, want %v", from, rb.LocalAddr())
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRelay: a session through one server and through two servers sharing a store
// carries datagrams both ways intact; closing one end ends the other with
// relay_closed, and the servers forget the session.
func TestRelay(t *testing.T) {
	shared := memstore.New(memstore.Config{})
	t.Cleanup(func() { shared.Close() })
	s1 := signaltest.Start(t, signal.Config{Store: shared}, false)
	s2 := signaltest.Start(t, signal.Config{Store: shared}, false)
	for _, tt := range []struct {
		name   string
		sa, sb *signaltest.Server
	}{{"one server", s1, s1}, {"two servers", s1, s2}} {
		t.Run(tt.name, func(t *testing.T) {
			a, b := tt.sa.Dial(t, nil), tt.sb.Dial(t, nil)
			ra, rb := relayPair(t, a, b, "sess-1")
			if rb.Peer() != a.NodeID() || ra.Peer() != b.NodeID() || rb.Tag() != "sess-1" || !ra.Opener() || rb.Opener() {
				t.Fatalf("ends: a sees %s, b sees %s tag %q", ra.Peer().Short(), rb.Peer().Short(), rb.Tag())
			}
			pingPong(t, ra, rb, 50)
			if st := ra.Stats(); st.Sent != 50 || st.Received != 50 || st.SendDropped+st.RecvDropped != 0 {
				t.Fatalf("a's stats %+v", st)
			}
			// A deadline in the past times ReadFrom out at once.
			ra.SetReadDeadline(time.Now().Add(-time.Second))
			var ne net.Error
			if _, _, err := ra.ReadFrom(make([]byte, 10)); !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("ReadFrom after the deadline: %v", err)
			}
			ra.SetReadDeadline(time.Time{})

			ra.Close()
			select {
			case <-rb.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("b's end did not close")
			}
			if !errors.Is(rb.Err(), signal.ErrRelayClosed) {
				t.Fatalf("b's end ended with %v, want relay_closed", rb.Err())
			}
			if _, err := rb.Recv(ctxT(t)); !errors.Is(err, net.ErrClosed) || !errors.Is(err, signal.ErrRelayClosed) {
				t.Fatalf("Recv after the peer closed: %v", err)
			}
			if err := ra.Send([]byte("x")); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Send after Close: %v", err)
			}
			waitFor(t, "sessions to be forgotten", func() bool {
				return s1.RelayStats().Sessions == 0 && s2.RelayStats().Sessions == 0
			})
		})
	}
}

// TestRelayEnds: a peer that disconnects ends its sessions at the other end, and a
// session opened and given up at once does not linger.
func TestRelayEnds(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	a, b := srv.Dial(t, nil), srv.Dial(t, nil)
	ra, _ := relayPair(t, a, b, "")
	b.Close()
	select {
	case <-ra.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a's end outlived b's connection")
	}
	if !errors.Is(ra.Err(), signal.ErrRelayClosed) {
		t.Fatalf("a's end: %v", ra.Err())
	}
	waitFor(t, "no sessions", func() bool { return srv.RelayStats().Sessions == 0 })

	// A client that closes ends its own sessions.
	c := srv.Dial(t, nil)
	_, rc := relayPair(t, a, c, "")
	a.Close()
	if _, err := rc.Recv(ctxT(t)); !errors.Is(err, signal.ErrRelayClosed) {
		t.Fatalf("c's Recv after a left: %v", err)
	}
}

// TestRelayOpenErrors: every way an open fails says why with its own error.
func TestRelayOpenErrors(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{Relay: signal.RelayConfig{OpenTimeout: 300 * time.Millisecond, MaxSessions: 2}}, false)
	off := signaltest.Start(t, signal.Config{Relay: signal.RelayConfig{Disabled: true}}, false)
	stranger, _ := identity.Generate()
	a := srv.Dial(t, nil)
	refuser := srv.Dial(t, &signal.Options{RelayFilter: func(identity.NodeID, string) bool { return false }})
	idle := srv.Dial(t, nil) // never accepts
	b := srv.Dial(t, nil)
	tests := []struct {
		name string
		c    *signal.Client
		to   identity.NodeID
		want error
	}{
		{"offline", a, stranger.NodeID(), signal.ErrPeerOffline},
		{"refused", a, refuser.NodeID(), signal.ErrRelayRefused},
		{"no answer", a, idle.NodeID(), signal.ErrRelayTimeout},
		{"itself", a, a.NodeID(), signal.ErrInvalid},
		{"disabled", off.Dial(t, nil), b.NodeID(), signal.ErrRelayUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			rc, err := tt.c.OpenRelay(ctxT(t), tt.to)
			if !errors.Is(err, tt.want) || rc != nil {
				t.Fatalf("OpenRelay = %v, %v; want %v", rc, err, tt.want)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("took %v", d)
			}
		})
	}
	t.Run("too many sessions", func(t *testing.T) {
		relayPair(t, a, b, "")
		relayPair(t, a, b, "")
		if _, err := a.OpenRelay(ctxT(t), b.NodeID()); !errors.Is(err, signal.ErrTooManySessions) {
			t.Fatalf("third session: %v", err)
		}
	})
	t.Run("given up", func(t *testing.T) {
		c := srv.Dial(t, nil)
		d := srv.Dial(t, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if _, err := c.OpenRelay(ctx, d.NodeID()); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("OpenRelay with d not accepting: %v", err)
		}
		// d accepts late: the session opens for nobody and c closes it.
		rd, err := d.AcceptRelay(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rd.Recv(ctxT(t)); !errors.Is(err, signal.ErrRelayClosed) {
			t.Fatalf("d's end of the abandoned session: %v", err)
		}
	})
}

// rawRelay is a hand-driven client for relay frames the real client never sends.
type rawRelay struct {
	*raw
}

// readAny reads the next message: a text frame, or a binary message's bytes.
func (r *rawRelay) readAny() (signal.Frame, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	typ, b, err := r.ws.Read(ctx)
	if err != nil {
		return signal.Frame{}, nil, err
	}
	if typ == websocket.MessageBinary {
		return signal.Frame{}, b, nil
	}
	f, err := signal.ParseFrame(b)
	return f, nil, err
}

// expect reads until a frame of type t and returns its body.
func (r *rawRelay) expect(t signal.Type) json.RawMessage {
	r.t.Helper()
	for {
		f, _, err := r.readAny()
		if err != nil {
			r.t.Fatalf("waiting for %s: %v", t, err)
		}
		if f.Type == t {
			return f.Body
		}
	}
}

func (r *rawRelay) expectClosed(code signal.Code) uint32 {
	r.t.Helper()
	var b struct {
		Session uint32
		Code    signal.Code
		Message string
	}
	json.Unmarshal(r.expect(signal.TypeRelayClosed), &b)
	if b.Code != code {
		r.t.Fatalf("relayClosed %s (%s), want %s", b.Code, b.Message, code)
	}
	return b.Session
}

func (r *rawRelay) binary(b []byte) {
	r.t.Helper()
	if err := r.ws.Write(context.Background(), websocket.MessageBinary, b); err != nil {
		r.t.Fatal(err)
	}
}

// open opens a session from the raw client to c and returns the raw end's session.
func (r *rawRelay) open(c *signal.Client) (uint32, *signal.RelayConn) {
	r.t.Helper()
	acc := make(chan *signal.RelayConn, 1)
	go func() {
		rc, _ := c.AcceptRelay(ctxT(r.t))
		acc <- rc
	}()
	r.send([]byte(fmt.Sprintf(`{"id":9,"relayOpen":{"nodeID":%q}}`, c.NodeID())))
	var b struct{ Session uint32 }
	json.Unmarshal(r.expect(signal.TypeRelayReady), &b)
	rc := <-acc
	if rc == nil {
		r.t.Fatal("accept failed")
	}
	return b.Session, rc
}

// TestRelayBadFrames: malformed relay frames, frames for sessions never opened and
// floods of them get clear errors and closed sessions, never a crash; the server goes
// on serving everyone else.
func TestRelayBadFrames(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	peer := srv.Dial(t, nil)
	tests := []struct {
		name string
		run  func(r *rawRelay)
	}{
		{"unauthenticated", func(r *rawRelay) {
			r.binary(signal.AppendRelayFrame(nil, 1, []byte("x")))
			r.expectError(signal.CodeUnauthenticated)
		}},
		{"never opened", func(r *rawRelay) {
			r.auth()
			r.binary(signal.AppendRelayFrame(nil, 12345, []byte("x")))
			if s := r.expectClosed(signal.CodeUnknownSession); s != 12345 {
				t.Fatalf("relayClosed names session %d", s)
			}
			r.alive()
		}},
		{"malformed on an open session", func(r *rawRelay) {
			r.auth()
			sid, rc := r.open(peer)
			bad := signal.AppendRelayFrame(nil, sid, []byte("hello"))
			r.binary(bad[:len(bad)-2]) // the length says 5, 3 follow
			r.expectClosed(signal.CodeMalformed)
			if _, err := rc.Recv(ctxT(t)); !errors.Is(err, signal.ErrRelayClosed) {
				t.Fatalf("peer's end after the malformed frame: %v", err)
			}
			r.alive()
		}},
		{"unknown frame type", func(r *rawRelay) {
			r.auth()
			r.binary([]byte{9, 0, 0, 0, 1, 0, 1, 'x'})
			r.expectError(signal.CodeMalformed)
			r.alive()
		}},
		{"empty message", func(r *rawRelay) {
			r.auth()
			r.binary(nil)
			r.expectError(signal.CodeMalformed)
			r.alive()
		}},
		{"relayReady for a session never opened", func(r *rawRelay) {
			r.auth()
			r.send([]byte(`{"id":4,"relayReady":{"session":77}}`))
			r.expectError(signal.CodeUnknownSession)
			r.alive()
		}},
		{"relayClose for a session never opened", func(r *rawRelay) {
			r.auth()
			r.send([]byte(`{"id":4,"relayClose":{"session":77}}`))
			r.expectError(signal.CodeUnknownSession)
		}},
		{"malformed relayOpen", func(r *rawRelay) {
			r.auth()
			r.send([]byte(`{"id":4,"relayOpen":{"nodeID":"nope"}}`))
			r.expectError(signal.CodeMalformed)
			r.send([]byte(`{"id":5,"relayOpen":{"nodeID":"` + peer.NodeID().String() + `","tag":"bad tag!"}}`))
			r.expectError(signal.CodeMalformed)
		}},
		{"flood of frames for unknown sessions", func(r *rawRelay) {
			r.auth()
			var msg []byte
			for i := range 200 {
				msg = signal.AppendRelayFrame(msg, uint32(1000+i), []byte("junk"))
			}
			r.binary(msg)
			r.raw.expectClosed(websocket.StatusPolicyViolation, signal.CodeTooManyErrors)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.run(&rawRelay{dialRaw(t, srv)})
		})
	}
	// Everyone else was never bothered.
	a := srv.Dial(t, nil)
	ra, rb := relayPair(t, a, peer, "")
	pingPong(t, ra, rb, 3)
	if st := srv.RelayStats(); st.BadFrames < 5 {
		t.Fatalf("relay stats %+v: bad frames not counted", st)
	}
}

// TestRelayFlood: a sender far over its bandwidth limit gets its session closed with
// relay_flood, and the peer hears the session ended.
func TestRelayFlood(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{Relay: signal.RelayConfig{Rate: 32 << 10, Burst: 16 << 10}}, false)
	a, b := srv.Dial(t, nil), srv.Dial(t, nil)
	ra, rb := relayPair(t, a, b, "")
	p := make([]byte, 1200)
	for ra.Err() == nil {
		ra.Send(p)
		time.Sleep(50 * time.Microsecond)
	}
	if !errors.Is(ra.Err(), signal.ErrRelayFlood) {
		t.Fatalf("flooder's end: %v", ra.Err())
	}
	<-rb.Done()
	if !errors.Is(rb.Err(), signal.ErrRelayClosed) {
		t.Fatalf("peer's end: %v", rb.Err())
	}
	if st := srv.RelayStats(); st.Floods != 1 || st.RateDropped == 0 {
		t.Fatalf("relay stats %+v", st)
	}
	// The flooder's connection survives; it just lost that session.
	exchange(t, a, b)
}

// TestRelayRateLimit: a node's datagrams beyond its bandwidth are dropped, so what
// arrives is about Rate × time + Burst.
func TestRelayRateLimit(t *testing.T) {
	const rate, burst = 200 << 10, 20 << 10
	srv := signaltest.Start(t, signal.Config{Relay: signal.RelayConfig{Rate: rate, Burst: burst, FloodFactor: -1}}, false)
	a, b := srv.Dial(t, nil), srv.Dial(t, nil)
	ra, rb := relayPair(t, a, b, "")
	p := make([]byte, 1000)
	start := time.Now()
	for time.Since(start) < time.Second {
		ra.Send(p)
		time.Sleep(20 * time.Microsecond)
	}
	// The client's queue drains for a moment after the last Send; the bucket refills
	// meanwhile.
	time.Sleep(100 * time.Millisecond)
	elapsed := time.Since(start)
	got := rb.Stats().ReceivedBytes
	limit := uint64((rate*elapsed.Seconds() + burst) * 1000 / 1007) // payload share of the cost
	t.Logf("sent %d bytes in %v, received %d (limit %d), server %+v", ra.Stats().SentBytes, elapsed, got, limit, srv.RelayStats())
	if got > limit+2000 || got < limit/2 {
		t.Fatalf("received %d bytes, want about %d", got, limit)
	}
	if srv.RelayStats().RateDropped == 0 {
		t.Fatal("nothing was dropped for the rate")
	}
}
