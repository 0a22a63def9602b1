package session

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/connect"
	"peerlink/identity"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/pion/transport/v4/deadline.(*Deadline).Set.func1"))
}

// pattern is a deterministic pseudo-random stream of n bytes.
type pattern struct {
	r *rand.ChaCha8
	n int64
}

func newPattern(seed byte, n int64) *pattern {
	var s [32]byte
	s[0] = seed
	return &pattern{r: rand.NewChaCha8(s), n: n}
}

func (p *pattern) Read(b []byte) (int, error) {
	if p.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > p.n {
		b = b[:p.n]
	}
	p.r.Read(b)
	p.n -= int64(len(b))
	return len(b), nil
}

// transfer sends size bytes from a to b on one stream and checks they arrive whole by
// SHA-256. It returns the throughput in Mbit/s.
func transfer(t testing.TB, a, b *Session, size int64, seed byte) float64 {
	return pacedTransfer(t, a, b, size, seed, 0)
}

// paced holds each MiB of a reader back by pace, to make a transfer last.
type paced struct {
	r    io.Reader
	pace time.Duration
	n    int
}

func (p *paced) Read(b []byte) (int, error) {
	if len(b) > 64<<10 {
		b = b[:64<<10]
	}
	k, err := p.r.Read(b)
	p.n += k
	if p.n >= 1<<20 {
		p.n -= 1 << 20
		time.Sleep(p.pace)
	}
	return k, err
}

// pacedTransfer is transfer, each MiB held back by pace.
func pacedTransfer(t testing.TB, a, b *Session, size int64, seed byte, pace time.Duration) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	type result struct {
		sum [32]byte
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		st, err := b.AcceptStream(ctx)
		if err != nil {
			got <- result{err: err}
			return
		}
		h := sha256.New()
		n, err := io.Copy(h, st)
		var r result
		copy(r.sum[:], h.Sum(nil))
		r.n, r.err = n, err
		got <- r
	}()
	start := time.Now()
	st, err := a.OpenStream(ctx)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	h := sha256.New()
	var src io.Reader = newPattern(seed, size)
	if pace > 0 {
		src = &paced{r: src, pace: pace}
	}
	if _, err := io.Copy(io.MultiWriter(st, h), src); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	r := <-got
	elapsed := time.Since(start)
	if r.err != nil {
		t.Fatalf("read: %v after %d bytes", r.err, r.n)
	}
	if r.n != size || !bytes.Equal(r.sum[:], h.Sum(nil)) {
		t.Fatalf("received %d bytes, sha256 %x; sent %d, sha256 %x", r.n, r.sum, size, h.Sum(nil))
	}
	return float64(size) * 8 / elapsed.Seconds() / 1e6
}

func TestTransfer(t *testing.T) {
	tests := []struct {
		name   string
		a, b   string
		method connect.Method
		size   int64
	}{
		{"punched", "ei-pd-pp", "ei-pd-pp", connect.MethodPunched, 32 << 20},
		{"relayed", "pd-pd-rd", "pd-pd-rd", connect.MethodRelayed, 32 << 20},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, uint64(i+1))
			a, b := w.node("a", tt.a, connect.PathCheck{}), w.node("b", tt.b, connect.PathCheck{})
			ca, cb := connPair(t, a, b, tt.method)
			sa, sb := sessionPair(t, ca, cb, a.id, b.id)
			if sa.Peer() != b.NodeID() || sb.Peer() != a.NodeID() {
				t.Errorf("peers %s/%s, want %s/%s", sa.Peer().Short(), sb.Peer().Short(), b.NodeID().Short(), a.NodeID().Short())
			}
			mbps := transfer(t, sa, sb, tt.size, byte(i))
			if sa.Method() != tt.method {
				t.Errorf("method %v after the transfer, want %v", sa.Method(), tt.method)
			}
			st := sa.Stats()
			t.Logf("%s: %d MiB in one stream at %.0f Mbit/s (emulator, -race as run); stats %+v", tt.name, tt.size>>20, mbps, st)
			if st.BytesSent < uint64(tt.size) || st.RTT <= 0 {
				t.Errorf("stats %+v: want at least %d bytes sent and an RTT", st, tt.size)
			}
		})
	}
}

// TestManyStreams runs streams concurrently in both directions: each side opens its
// own, the other echoes, and every echo must come back intact.
func TestManyStreams(t *testing.T) {
	w := newWorld(t, 7)
	a, b := w.node("a", "ei-pd-pp", connect.PathCheck{}), w.node("b", "ei-pd-pp", connect.PathCheck{})
	ca, cb := connPair(t, a, b, connect.MethodPunched)
	sa, sb := sessionPair(t, ca, cb, a.id, b.id)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	echo := func(s *Session) {
		for {
			st, err := s.AcceptStream(ctx)
			if err != nil {
				return
			}
			go func() {
				io.Copy(st, st)
				st.Close()
			}()
		}
	}
	go echo(sa)
	go echo(sb)
	const streams, size = 40, 128 << 10
	errs := make(chan error, 2*streams)
	var wg sync.WaitGroup
	for i := range 2 * streams {
		from := sa
		if i%2 == 1 {
			from = sb
		}
		wg.Go(func() {
			st, err := from.OpenStream(ctx)
			if err != nil {
				errs <- err
				return
			}
			want := make([]byte, size)
			newPattern(byte(i), size).Read(want)
			go func() {
				st.Write(want)
				st.Close()
			}()
			got, err := io.ReadAll(st)
			if err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			if !bytes.Equal(got, want) {
				errs <- fmt.Errorf("stream %d: echo of %d bytes differs (%d back)", i, size, len(got))
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestDatagrams(t *testing.T) {
	w := newWorld(t, 8)
	a, b := w.node("a", "pd-pd-rd", connect.PathCheck{}), w.node("b", "pd-pd-rd", connect.PathCheck{})
	ca, cb := connPair(t, a, b, connect.MethodRelayed)
	sa, sb := sessionPair(t, ca, cb, a.id, b.id)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	const count = 200
	got := map[string]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for len(got) < count {
			rctx, rcancel := context.WithTimeout(ctx, time.Second)
			d, err := sb.ReceiveDatagram(rctx)
			rcancel()
			if err != nil {
				return
			}
			got[string(d)] = true
		}
	}()
	for i := range count {
		if err := sa.SendDatagram(fmt.Appendf(nil, "datagram %d", i)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	<-done
	// The emulator loses nothing here: all should arrive, but datagrams are unreliable.
	if len(got) < count*9/10 {
		t.Errorf("%d of %d datagrams arrived", len(got), count)
	}
	for d := range got {
		var i int
		if _, err := fmt.Sscanf(d, "datagram %d", &i); err != nil || i < 0 || i >= count {
			t.Errorf("unexpected datagram %q", d)
		}
	}
	if err := sa.SendDatagram(make([]byte, 4000)); !errors.Is(err, ErrDatagramTooLarge) {
		t.Errorf("4000-byte datagram: %v, want ErrDatagramTooLarge", err)
	}
	if err := sa.SendDatagram(make([]byte, 1000)); err != nil {
		t.Errorf("1000-byte datagram: %v", err)
	}
}

// TestWrongPeer: a node that presents another key than the one connect authenticated
// is refused, whichever side it is on, with ErrPeerMismatch on the side that checked.
func TestWrongPeer(t *testing.T) {
	tests := []struct {
		name        string
		impostorIsB bool // else the client (a) is the impostor
	}{
		{"server presents another key", true},
		{"client presents another key", false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, uint64(20+i))
			a, b := w.node("a", "ei-pd-pp", connect.PathCheck{}), w.node("b", "ei-pd-pp", connect.PathCheck{})
			ca, cb := connPair(t, a, b, connect.MethodPunched)
			other, err := identity.Generate()
			if err != nil {
				t.Fatal(err)
			}
			ida, idb := a.id, b.id
			if tt.impostorIsB {
				idb = other
			} else {
				ida = other
			}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			var errB error
			var sb *Session
			var wg sync.WaitGroup
			wg.Go(func() { sb, errB = Server(ctx, cb, Config{Identity: idb}) })
			start := time.Now()
			sa, errA := Client(ctx, ca, Config{Identity: ida})
			wg.Wait()
			if sb != nil {
				sb.Close()
			}
			if sa != nil {
				// TLS 1.3: the client is done before the server checks its certificate,
				// so a refused client learns it as its session's end.
				select {
				case <-sa.Done():
					errA = sa.Err()
				case <-time.After(5 * time.Second):
				}
				sa.Close()
			}
			checker, other2 := errA, errB
			if !tt.impostorIsB {
				checker, other2 = errB, errA
			}
			if !errors.Is(checker, ErrPeerMismatch) {
				t.Errorf("the checking side: %v, want ErrPeerMismatch", checker)
			}
			if other2 == nil {
				t.Error("the impostor's side still has a session")
			}
			if d := time.Since(start); d > 8*time.Second {
				t.Errorf("refusing took %v", d)
			}
			t.Logf("checker: %v; impostor: %v", checker, other2)
		})
	}
}

// TestFallback: a transfer on a punched path whose direct path dies half way (the NAT
// drops the peer's packets) moves to the relay within 5 s and completes intact; when
// the direct path comes back, the connection returns to it after a retry.
func TestFallback(t *testing.T) {
	w := newWorld(t, 9)
	pc := connect.PathCheck{Retry: 2 * time.Second}
	a, b := w.node("a", "ei-pd-pp", pc), w.node("b", "ei-pd-pp", pc)
	ca, cb := connPair(t, a, b, connect.MethodPunched)
	sa, sb := sessionPair(t, ca, cb, a.id, b.id)

	cutDone := make(chan time.Time, 1)
	var took time.Duration
	go func() {
		time.Sleep(time.Second)
		a.cut.on.Store(true)
		start := time.Now()
		for ca.Method() != connect.MethodRelayed || cb.Method() != connect.MethodRelayed {
			if time.Since(start) > 10*time.Second {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		took = time.Since(start)
		cutDone <- time.Now()
	}()
	// At least 5 s: the cut comes after 1 s, the move about 3 s later, and the rest
	// after it.
	pacedTransfer(t, sa, sb, 12<<20, 3, 420*time.Millisecond)
	ended := time.Now()
	if moved := <-cutDone; moved.After(ended) {
		t.Errorf("the transfer ended %v before the move to the relay: it did not cross it", moved.Sub(ended))
	}
	if ca.Method() != connect.MethodRelayed || cb.Method() != connect.MethodRelayed {
		t.Fatalf("after the cut: %v / %v, want relayed on both", ca.Method(), cb.Method())
	}
	if took > 5*time.Second {
		t.Errorf("moving to the relay took %v, want within 5 s", took)
	}
	t.Logf("moved to the relay %v after the cut; stats %+v", took.Round(time.Millisecond), sa.Stats())
	if sa.Stats().Fallbacks < 1 {
		t.Errorf("Fallbacks = %d, want ≥ 1", sa.Stats().Fallbacks)
	}
	// Healed: back to direct within a retry (2 s) and its probe, and no flapping.
	a.cut.on.Store(false)
	waitMethod(t, ca, connect.MethodPunched, 8*time.Second)
	waitMethod(t, cb, connect.MethodPunched, 8*time.Second)
	transfer(t, sa, sb, 1<<20, 4)
	if s := ca.Stats(); s.Fallbacks != 1 || s.Restores != 1 {
		t.Errorf("connection stats %+v: want exactly one fallback and one restore", s)
	}
}

// TestClose: closing one side ends the other's streams and accepts with ErrClosed, and
// no goroutine is left (TestMain checks).
func TestClose(t *testing.T) {
	w := newWorld(t, 10)
	a, b := w.node("a", "ei-pd-pp", connect.PathCheck{}), w.node("b", "ei-pd-pp", connect.PathCheck{})
	ca, cb := connPair(t, a, b, connect.MethodPunched)
	sa, sb := sessionPair(t, ca, cb, a.id, b.id)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := sa.OpenStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st.Write([]byte("hello"))
	rs, err := sb.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(rs, buf); err != nil {
		t.Fatal(err)
	}
	accepted := make(chan error, 1)
	go func() {
		_, err := sb.AcceptStream(ctx)
		accepted <- err
	}()
	sa.Close()
	sa.Close() // idempotent
	if err := <-accepted; !errors.Is(err, ErrClosed) {
		t.Errorf("peer's AcceptStream after Close: %v, want ErrClosed", err)
	}
	if _, err := rs.Read(buf); !errors.Is(err, ErrClosed) {
		t.Errorf("peer's Read after Close: %v, want ErrClosed", err)
	}
	if _, err := sa.OpenStream(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("OpenStream after Close: %v, want ErrClosed", err)
	}
	if err := sa.SendDatagram([]byte("x")); !errors.Is(err, ErrClosed) {
		t.Errorf("SendDatagram after Close: %v, want ErrClosed", err)
	}
	select {
	case <-sb.Done():
	case <-time.After(5 * time.Second):
		t.Error("the peer's session did not end")
	}
	if _, err := ca.Recv(ctx); !errors.Is(err, connect.ErrClosed) {
		t.Errorf("the connect.Conn under a closed session: %v, want closed", err)
	}
}

func TestStats(t *testing.T) {
	sa, sb := probedPair(t, 11)
	time.Sleep(time.Second)
	for _, s := range []*Session{sa, sb} {
		st := s.Stats()
		t.Logf("%+v", st)
		if st.Method != connect.MethodPunched || st.RTT <= 0 || st.ProbeRTT <= 0 || st.Quality < 50 || st.Quality > 100 || st.Loss < 0 || st.Loss > 0.2 {
			t.Errorf("stats %+v: want punched, RTT and probe RTT measured, quality 50-100, little loss", st)
		}
	}
}

func TestQuality(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		rtt, jitter time.Duration
		loss        float64
		min, max    int
	}{
		{0, 0, 0, 99, 100},
		{20 * ms, 2 * ms, 0, 97, 100},
		{100 * ms, 10 * ms, 0.01, 90, 97},
		{300 * ms, 30 * ms, 0.02, 70, 85},
		{600 * ms, 100 * ms, 0.05, 30, 60},
		{time.Second, 0, 0.5, 0, 0},
		{0, 0, 2, 0, 0},
	}
	for _, tt := range tests {
		q := Quality(tt.rtt, tt.jitter, tt.loss)
		if q < tt.min || q > tt.max {
			t.Errorf("Quality(%v, %v, %v) = %d, want %d-%d", tt.rtt, tt.jitter, tt.loss, q, tt.min, tt.max)
		}
	}
	// Worse in any one measure is never better.
	if Quality(50*ms, 5*ms, 0.01) < Quality(80*ms, 5*ms, 0.01) || Quality(50*ms, 5*ms, 0.01) < Quality(50*ms, 5*ms, 0.03) {
		t.Error("quality is not monotonic")
	}
}

func TestKeepAlive(t *testing.T) {
	s := time.Second
	tests := []struct {
		cfg      time.Duration
		lifetime time.Duration
		want     time.Duration
	}{
		{0, 0, 15 * s},
		{0, 120 * s, 15 * s},
		{0, 20 * s, 10 * s},
		{0, s, s},
		{5 * s, 20 * s, 5 * s},
		{-1, 20 * s, 0},
	}
	for _, tt := range tests {
		if got := (Config{KeepAlive: tt.cfg}).keepAlive(tt.lifetime); got != tt.want {
			t.Errorf("KeepAlive %v, binding lifetime %v: %v, want %v", tt.cfg, tt.lifetime, got, tt.want)
		}
	}
}

// TestUDPOutage drops all of one node's UDP — direct path, relay and STUN alike — for
// 10 s in the middle of a stream transfer: the session outlives it (its idle timeout is
// longer), the transfer completes intact, and the connection is direct again afterwards.
func TestUDPOutage(t *testing.T) {
	w := newWorld(t, 11)
	pc := connect.PathCheck{Retry: 2 * time.Second}
	a, b := w.node("a", "ei-pd-pp", pc), w.node("b", "ei-pd-pp", pc)
	ca, cb := connPair(t, a, b, connect.MethodPunched)
	sa, sb := sessionPair(t, ca, cb, a.id, b.id)

	outage := make(chan struct{})
	go func() {
		defer close(outage)
		time.Sleep(time.Second)
		a.cut.all.Store(true)
		time.Sleep(10 * time.Second)
		a.cut.all.Store(false)
	}()
	start := time.Now()
	// About 4 s of paced sending: most of it waits out the outage.
	pacedTransfer(t, sa, sb, 8<<20, 5, 500*time.Millisecond)
	<-outage
	if took := time.Since(start); took < 10*time.Second {
		t.Fatalf("the transfer took %v: it did not cross the 10 s outage", took)
	}
	waitMethod(t, ca, connect.MethodPunched, 10*time.Second)
	transfer(t, sa, sb, 1<<20, 6)
	if err := sa.Err(); err != nil {
		t.Errorf("session ended: %v", err)
	}
	t.Logf("transfer across the outage took %v; stats %+v", time.Since(start).Round(time.Millisecond), sa.Stats())
}
