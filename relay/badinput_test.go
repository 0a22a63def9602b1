package relay_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pion/stun/v3"
	"github.com/prometheus/client_golang/prometheus"

	"peerlink/relay"
	"peerlink/relay/relaytest"
)

// TestBadInput throws malformed traffic at a relay that is relaying a session, and
// checks the relay drops it, counts it and keeps relaying.
func TestBadInput(t *testing.T) {
	r, c, relayed, p := relayPair(t, relay.Config{})
	if code := c.bind(0x4000, p.addr); code != 0 {
		t.Fatal(code)
	}
	stunHeader := func(typ, length uint16) []byte {
		b := make([]byte, 20)
		binary.BigEndian.PutUint16(b, typ)
		binary.BigEndian.PutUint16(b[2:], length)
		binary.BigEndian.PutUint32(b[4:], 0x2112A442)
		return b
	}
	inputs := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"one byte", []byte{0x40}},
		{"truncated ChannelData header", []byte{0x40, 0x00, 0x00}},
		{"ChannelData longer than the datagram", []byte{0x40, 0x00, 0x00, 0x10, 1, 2, 3}},
		{"ChannelData on an unbound channel", []byte{0x40, 0x05, 0x00, 0x01, 1}},
		{"reserved first bits", []byte{0xC0, 0, 0, 0, 0, 0}},
		{"STUN header only, claims a body", stunHeader(0x0001, 8)},
		{"STUN length not a multiple of 4", stunHeader(0x0003, 2)},
		{"STUN bad cookie", append([]byte{0, 1, 0, 0, 1, 2, 3, 4}, make([]byte, 12)...)},
		{"Send indication with no attributes", stunHeader(0x0016, 0)},
		{"Send indication, attribute overruns", append(stunHeader(0x0016, 8), 0x00, 0x12, 0x00, 0x40, 0, 0, 0, 0)},
		{"allocate with garbage attributes", append(stunHeader(0x0003, 8), 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4)},
	}
	for _, in := range inputs {
		c.send(in.b)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		b := make([]byte, rng.IntN(200))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		c.send(b)
	}
	// The session still works both ways, and the relay counted what it dropped.
	c.sendChannel(0x4000, []byte("still here"))
	if got, _, ok := p.recv(waitData); !ok || string(got) != "still here" {
		t.Fatalf("after garbage, peer got %q", got)
	}
	p.sendTo(relayed, []byte("and back"))
	for {
		b, ok := c.next(waitData)
		if !ok {
			t.Fatal("after garbage, nothing relayed to the client")
		}
		// Error responses to the garbage requests may come first.
		if b[0]&0xC0 == 0x40 {
			break
		}
	}
	st := r.Stats()
	if st.Dropped(relay.DropMalformed) < 5 || st.Dropped(relay.DropNoChannel) < 1 {
		t.Fatalf("drops %v", st.Drops)
	}
}

func TestBadTCPStreams(t *testing.T) {
	r := relaytest.Start(t, relay.Config{})
	for _, tt := range []struct {
		name string
		b    []byte
	}{
		{"not TURN", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
		{"reserved first bits", []byte{0xC0, 0, 0, 4, 1, 2, 3, 4}},
		{"channel number out of range", []byte{0x80, 0, 0, 4, 1, 2, 3, 4}},
		{"STUN length not a multiple of 4", []byte{0, 1, 0, 3, 0x21, 0x12, 0xA4, 0x42}},
		{"bad cookie", []byte{0, 1, 0, 0, 1, 2, 3, 4}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", r.TCP.String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.Write(tt.b)
			conn.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := io.ReadAll(conn); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatal("connection left open after a stream that is not TURN")
				}
			}
		})
	}
	t.Run("frame split across writes", func(t *testing.T) {
		c := dialTURN(t, "tcp", r.TCP, relaytest.User, relaytest.Password)
		m := c.build(stun.MethodBinding, false)
		ch := c.await(m.TransactionID)
		for _, b := range m.Raw {
			c.send([]byte{b})
		}
		select {
		case resp := <-ch:
			if errCode(resp) != 0 {
				t.Fatalf("error %d", errCode(resp))
			}
		case <-time.After(3 * time.Second):
			t.Fatal("no answer to a request sent a byte at a time")
		}
	})
}

func TestUnauthenticatedFlood(t *testing.T) {
	r := relaytest.Start(t, relay.Config{})
	conn, err := net.Dial("udp", r.UDP.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const n = 5000
	c := &turnClient{t: t}
	for range n {
		if _, err := conn.Write(c.build(stun.MethodAllocate, false, udpTransport).Raw); err != nil {
			t.Fatal(err)
		}
	}
	// Not every answer survives the client's socket buffer; those that do are 401s.
	challenges := 0
	buf := make([]byte, 1500)
	for {
		conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		k, err := conn.Read(buf)
		if err != nil {
			break
		}
		m := &stun.Message{Raw: buf[:k]}
		if m.Decode() != nil || errCode(m) != 401 {
			t.Fatalf("answer to an unauthenticated Allocate: %v", m)
		}
		challenges++
	}
	if challenges == 0 {
		t.Fatal("no 401 answers")
	}
	if st := r.Stats(); st.Sessions != 0 || st.SessionsTotal != 0 {
		t.Fatalf("unauthenticated requests allocated: %+v", st)
	}
	// Most of the flood is over the source's request rate: dropped, not challenged.
	limited := r.Stats().Dropped(relay.DropRateLimitedUnauth)
	if limited == 0 || challenges > n-int(limited) {
		t.Errorf("%d of %d requests rate-limited, %d challenged", limited, n, challenges)
	}
	// The relay still serves real clients, even from the flooding address once the
	// wait above has earned it a few tokens.
	dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password).allocate()
	t.Logf("%d requests, %d rate-limited, %d challenges read back", n, limited, challenges)
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	_, c, relayed, p := relayPair(t, relay.Config{Metrics: reg})
	c.permit(p.addr)
	p.sendTo(relayed, []byte("12345"))
	if _, ok := c.next(waitData); !ok {
		t.Fatal("nothing relayed")
	}
	c.send([]byte{0x40, 0, 0, 9})
	want := map[string]float64{
		`peerlink_relay_sessions`:                                   1,
		`peerlink_relay_allocations_total`:                          1,
		`peerlink_relay_relayed_bytes_total{direction="to_client"}`: 5,
		`peerlink_relay_dropped_packets_total{reason="malformed"}`:  1,
		`peerlink_relay_enabled`:                                    1,
	}
	waitFor(t, func() bool {
		got := gather(t, reg)
		for k, v := range want {
			if got[k] != v {
				return false
			}
		}
		return true
	})
}

func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]float64)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+`="`+l.GetValue()+`"`)
			}
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetCounter() != nil:
				out[name] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				out[name] = m.GetGauge().GetValue()
			}
		}
	}
	return out
}

type fakeRegistrar struct {
	mu    sync.Mutex
	regs  []relay.Registration
	loads []relay.Load
}

func (f *fakeRegistrar) Register(_ context.Context, r relay.Registration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.regs = append(f.regs, r)
	return nil
}

func (f *fakeRegistrar) Heartbeat(_ context.Context, l relay.Load) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.loads = append(f.loads, l)
	return nil
}

func TestRegistrar(t *testing.T) {
	reg := &fakeRegistrar{}
	r := relaytest.Start(t, relay.Config{Registrar: reg, HeartbeatInterval: 20 * time.Millisecond, MaxSessions: 7})
	c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	c.allocate()
	waitFor(t, func() bool {
		reg.mu.Lock()
		defer reg.mu.Unlock()
		return len(reg.loads) > 0 && reg.loads[len(reg.loads)-1].Sessions == 1
	})
	reg.mu.Lock()
	defer reg.mu.Unlock()
	if len(reg.regs) != 1 {
		t.Fatalf("registered %d times", len(reg.regs))
	}
	got := reg.regs[0]
	want := []relay.Endpoint{{Transport: relay.UDP, Addr: r.UDP.String()}, {Transport: relay.TCP, Addr: r.TCP.String()}}
	if got.MaxSessions != 7 || len(got.Endpoints) != 2 || got.Endpoints[0] != want[0] || got.Endpoints[1] != want[1] {
		t.Fatalf("registration %+v, want endpoints %v and 7 sessions", got, want)
	}
	if l := reg.loads[len(reg.loads)-1]; !l.Enabled {
		t.Fatalf("load %+v", l)
	}
}
