package connect

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/nettype"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// cutter cuts a node's sockets off from every address but the STUN and TURN servers',
// in one direction or both, as a NAT that dropped the peer's mapping would.
type cutter struct {
	in, out atomic.Bool
}

func (c *cutter) wrap(l nettype.PacketListener) nettype.PacketListener {
	return cutListener{l, c}
}

type cutListener struct {
	nettype.PacketListener
	c *cutter
}

func (l cutListener) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	pc, err := l.PacketListener.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return &cutConn{pc, l.c}, nil
}

type cutConn struct {
	net.PacketConn
	c *cutter
}

func kept(a net.Addr) bool {
	ip := addrPortOf(a).Addr()
	return ip == stunIP1 || ip == stunIP2 || ip == turnIP
}

func (c *cutConn) WriteTo(b []byte, a net.Addr) (int, error) {
	if c.c.out.Load() && !kept(a) {
		return len(b), nil
	}
	return c.PacketConn.WriteTo(b, a)
}

func (c *cutConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, a, err := c.PacketConn.ReadFrom(b)
		if err != nil || !c.c.in.Load() || kept(a) {
			return n, a, err
		}
	}
}

// TestDirectPathFallback: when a punched path stops carrying packets, in either
// direction or both, both ends move to the relay within 5 s and datagrams keep
// flowing; once it carries packets again, both move back after a retry, once.
func TestDirectPathFallback(t *testing.T) {
	sig := signaltest.Start(t, signal.Config{}, false)
	tests := []struct {
		name    string
		in, out bool
	}{
		{"both directions", true, true},
		{"a's outbound only", false, true},
		{"a's inbound only", true, false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, uint64(70+i), sig)
			var cut cutter
			pc := PathCheck{Retry: time.Second}
			a := w.node("a", nodeOpts{typ: mustType(t, "ei-pd-pp"), wrap: cut.wrap, pathCheck: pc})
			b := w.node("b", nodeOpts{typ: mustType(t, "ei-pd-pp"), pathCheck: pc})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			ca, cb := connected(t, a, b)
			both := func(m Method, within time.Duration) time.Duration {
				t.Helper()
				return bothMethod(t, ca, cb, m, within)
			}
			both(MethodPunched, 10*time.Second)
			// The relayed path must be confirmed before there is somewhere to fall back to.
			for !relayUp(ca) || !relayUp(cb) {
				if ctx.Err() != nil {
					t.Fatal("the relayed path never came up")
				}
				time.Sleep(10 * time.Millisecond)
			}

			cut.in.Store(tt.in)
			cut.out.Store(tt.out)
			took := both(MethodRelayed, 5*time.Second)
			if err := roundTrip(ctx, ca, cb, "relayed a→b"); err != nil {
				t.Fatal(err)
			}
			if err := roundTrip(ctx, cb, ca, "relayed b→a"); err != nil {
				t.Fatal(err)
			}
			// Still cut: retries fail and nothing flaps back.
			time.Sleep(2500 * time.Millisecond)
			if ca.Method() != MethodRelayed || cb.Method() != MethodRelayed {
				t.Errorf("while cut: %v / %v, want relayed", ca.Method(), cb.Method())
			}

			cut.in.Store(false)
			cut.out.Store(false)
			back := both(MethodPunched, 5*time.Second)
			if err := roundTrip(ctx, ca, cb, "direct again"); err != nil {
				t.Fatal(err)
			}
			for _, c := range []*Conn{ca, cb} {
				if s := c.Stats(); s.Fallbacks != 1 || s.Restores != 1 {
					t.Errorf("stats %+v: want one fallback and one restore", s)
				}
			}
			t.Logf("relayed %v after the cut, direct again %v after healing", took.Round(time.Millisecond), back.Round(time.Millisecond))
		})
	}
}

func relayUp(c *Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.relayUp
}
