package faultlab

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/connect/connecttest"
	"peerlink/signal"
)

// swapServer is a rendezvous server on loopback that can go down (every client
// disconnected, new ones refused with 503) and come back as a new server on the same
// URL, as a restarted one does.
type swapServer struct {
	t   *testing.T
	url string
	cur atomic.Pointer[signal.Server]
}

func startSwapServer(t *testing.T) *swapServer {
	t.Helper()
	s := &swapServer{t: t}
	s.up()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.cur.Load().ServeHTTP(w, r) })}
	go hs.Serve(ln)
	t.Cleanup(func() {
		hs.Close()
		s.cur.Load().Close()
	})
	s.url = "ws://" + ln.Addr().String() + "/"
	return s
}

// down closes the server: its clients are disconnected and new ones refused.
func (s *swapServer) down() { s.cur.Load().Close() }

// up puts a new server in place.
func (s *swapServer) up() {
	srv, err := signal.NewServer(signal.Config{})
	if err != nil {
		s.t.Fatal(err)
	}
	if old := s.cur.Swap(srv); old != nil {
		old.Close()
	}
}

// TestReconnector takes a rendezvous server down under two nodes in the emulator for
// longer than several backoffs, brings it back, and checks that each node is given a
// new client after retrying with a growing backoff, keeps its connection, and that new
// connections work both ways through the new clients.
func TestReconnector(t *testing.T) {
	srv := startSwapServer(t)
	w := connecttest.NewWorld(t, connecttest.Config{Seed: 7, SignalURL: srv.url})
	a := w.AddNode(connecttest.NodeConfig{NAT: "ei-pd-pp"})
	b := w.AddNode(connecttest.NodeConfig{NAT: "ei-pd-pp"})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ca, cb, err := connecttest.Pair(ctx, a, b, connect.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	defer cb.Close()

	const initial = 40 * time.Millisecond
	var dials atomic.Int32
	reconnected := make(chan Reconnection, 2)
	keep := func(n *connecttest.Node) *Reconnector {
		r, err := Reconnect(n.Node, n.Signal, ReconnectConfig{
			Initial: initial, Max: 200 * time.Millisecond, Timeout: 5 * time.Second,
			Dial: func(ctx context.Context) (*signal.Client, error) {
				dials.Add(1)
				return signal.Dial(ctx, srv.url, n.Identity, nil)
			},
			OnReconnect: func(r Reconnection) { reconnected <- r },
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	ra, rb := keep(a), keep(b)

	const downtime = 600 * time.Millisecond
	srv.down()
	downAt := time.Now()
	time.Sleep(downtime)
	srv.up()
	for range 2 {
		select {
		case r := <-reconnected:
			// Backoffs of 40, 80, 160, 200, 200 ms, each jittered to at least half:
			// several attempts fail before the server is back.
			if r.Attempts < 3 || r.LastErr == nil {
				t.Errorf("reconnected after %d attempts (last error %v), want several failed ones while the server was down", r.Attempts, r.LastErr)
			}
			if r.Up.Before(downAt.Add(downtime)) || r.Took() > downtime+2*time.Second {
				t.Errorf("reconnected %v after the loss, want after the %v downtime and soon after it", r.Took(), downtime)
			}
			t.Logf("reconnected after %v, %d attempts", r.Took().Round(time.Millisecond), r.Attempts)
		case <-ctx.Done():
			t.Fatal("a node did not reconnect")
		}
	}
	if ra.Client() == a.Signal || rb.Client() == b.Signal {
		t.Fatal("the Reconnector still reports the first client")
	}
	if len(ra.Reconnections()) != 1 || len(rb.Reconnections()) != 1 {
		t.Errorf("reconnections %d and %d, want 1 each", len(ra.Reconnections()), len(rb.Reconnections()))
	}
	if err := roundTrip(ctx, ca, cb); err != nil {
		t.Errorf("the connection made before the outage: %v", err)
	}
	for _, d := range []struct{ from, to *connecttest.Node }{{a, b}, {b, a}} {
		c1, c2, err := connecttest.Pair(ctx, d.from, d.to, connect.Options{})
		if err != nil {
			t.Fatalf("a new connection after reconnecting: %v", err)
		}
		err = roundTrip(ctx, c1, c2)
		c1.Close()
		c2.Close()
		if err != nil {
			t.Fatalf("a new connection after reconnecting: %v", err)
		}
	}

	// Close ends a Reconnector in the middle of its backoff, at once and only once.
	n := dials.Load()
	srv.down()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	ra.Close()
	ra.Close()
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close took %v while reconnecting", d)
	}
	if d := dials.Load(); d <= n {
		t.Errorf("no dial after the second loss (%d dials before, %d after)", n, d)
	}
	select {
	case <-ra.Client().Done():
	default:
		t.Error("Close left the current client open")
	}
}

func TestReconnectNeedsDial(t *testing.T) {
	if _, err := Reconnect(nil, nil, ReconnectConfig{}); !errors.Is(err, ErrNoDial) {
		t.Errorf("Reconnect without Dial: %v, want ErrNoDial", err)
	}
}

func TestJitter(t *testing.T) {
	for _, d := range []time.Duration{0, 1, 2, time.Millisecond, time.Second} {
		for range 100 {
			if j := jitter(d); j > d || (d >= 2 && (j < d/2 || j >= d)) {
				t.Fatalf("jitter(%v) = %v, want within [d/2, d)", d, j)
			}
		}
	}
}

// roundTrip sends datagrams from a until b has one, and then the other way.
func roundTrip(ctx context.Context, a, b *connect.Conn) error {
	for _, d := range []struct{ from, to *connect.Conn }{{a, b}, {b, a}} {
		got := make(chan error, 1)
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		go func() {
			_, err := d.to.Recv(rctx)
			got <- err
		}()
		var err error
	sending:
		for {
			d.from.Send([]byte("hello"))
			select {
			case err = <-got:
				break sending
			case <-time.After(50 * time.Millisecond):
			}
		}
		cancel()
		if err != nil {
			return err
		}
	}
	return nil
}
