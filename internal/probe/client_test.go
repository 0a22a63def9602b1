package probe

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/nat"
	"peerlink/nettype"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// startLoopback runs a server on two loopback addresses, which every Linux host has
// without configuration.
func startLoopback(t *testing.T) *Server {
	t.Helper()
	s, err := Listen(context.Background(), ServerConfig{Endpoints: Endpoints{
		Primary:   netip.MustParseAddr("127.0.0.1"),
		Alternate: netip.MustParseAddr("127.0.0.2"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
	ep := s.Endpoints()
	if ep.Port == 0 || ep.AltPort == 0 || ep.Port == ep.AltPort {
		t.Fatalf("server endpoints %v", ep)
	}
	return s
}

func TestMeasureNoNAT(t *testing.T) {
	s := startLoopback(t)
	c := &Client{Server: s.Endpoints(), LocalIP: netip.MustParseAddr("127.0.0.1"), Timeout: 200 * time.Millisecond}
	r, err := c.Measure(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	p := r.Profile()
	want := nat.Type{Mapping: nat.MappingEI, Filtering: nat.FilteringEI, Allocation: nat.AllocationPP}
	if !p.Open || p.UDPBlocked || p.Type() != want {
		t.Fatalf("measured %+v (%s), want open %s", p, r, want)
	}
	if len(r.Allocation.Samples) != 5 {
		t.Fatalf("allocation used %d sockets, want 5", len(r.Allocation.Samples))
	}
	for i, m := range r.Mapping.Mapped {
		if m != r.Mapping.Local {
			t.Errorf("mapping test %d saw %s, want the local address %s", i+1, m, r.Mapping.Local)
		}
	}
}

// A zero LocalIP cannot tell "no NAT" from a port-preserving NAT, so it must not claim Open.
func TestNoLocalIPNeverOpen(t *testing.T) {
	s := startLoopback(t)
	c := &Client{Server: s.Endpoints(), Timeout: 200 * time.Millisecond}
	r, err := c.Mapping(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if r.Open || r.Mapping != nat.MappingEI {
		t.Fatalf("got %s open=%v, want ei and not open", r, r.Open)
	}
}

// filterListener opens real sockets whose reads drop what a NAT with the given filtering
// would drop. FilteringUnknown drops everything (UDP blocked).
type filterListener struct{ policy nat.Filtering }

func (f filterListener) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	c, err := nettype.Std{}.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return &filterConn{PacketConn: c, policy: f.policy, sent: map[netip.AddrPort]bool{}}, nil
}

type filterConn struct {
	net.PacketConn
	policy nat.Filtering
	mu     sync.Mutex
	sent   map[netip.AddrPort]bool
}

func (c *filterConn) WriteTo(b []byte, to net.Addr) (int, error) {
	ap, _ := addrPortOf(to)
	c.mu.Lock()
	c.sent[ap] = true
	c.mu.Unlock()
	return c.PacketConn.WriteTo(b, to)
}

func (c *filterConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, from, err := c.PacketConn.ReadFrom(b)
		if err != nil {
			return n, from, err
		}
		ap, _ := addrPortOf(from)
		if c.allowed(ap) {
			return n, from, nil
		}
	}
}

func (c *filterConn) allowed(from netip.AddrPort) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch c.policy {
	case nat.FilteringEI:
		return true
	case nat.FilteringHD:
		for s := range c.sent {
			if s.Addr() == from.Addr() {
				return true
			}
		}
		return false
	case nat.FilteringPD:
		return c.sent[from]
	}
	return false
}

func TestFilteringPolicies(t *testing.T) {
	s := startLoopback(t)
	tests := []struct {
		policy                 nat.Filtering
		changeBoth, changePort bool
	}{
		{nat.FilteringEI, true, true},
		{nat.FilteringHD, false, true},
		{nat.FilteringPD, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.policy.String(), func(t *testing.T) {
			c := &Client{Listener: filterListener{tt.policy}, Server: s.Endpoints(), Timeout: 100 * time.Millisecond, Attempts: 2}
			r, err := c.Filtering(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if r.Filtering != tt.policy || r.ChangeBoth != tt.changeBoth || r.ChangePort != tt.changePort {
				t.Fatalf("got %s, want %s", r, tt.policy)
			}
		})
	}
}

func TestUDPBlocked(t *testing.T) {
	s := startLoopback(t)
	c := &Client{Listener: filterListener{nat.FilteringUnknown}, Server: s.Endpoints(), Timeout: 50 * time.Millisecond, Attempts: 2}
	start := time.Now()
	r, err := c.Measure(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !r.UDPBlocked || !r.Profile().UDPBlocked {
		t.Fatalf("got %s, want udp blocked", r)
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Fatalf("gave up after %v, before two attempts of 50ms", d)
	}
	// A path that was dead from the start is also an error for the filtering test, not a
	// verdict of "port-dependent".
	if _, err := c.Filtering(context.Background()); !errors.Is(err, ErrNoAnswer) {
		t.Fatalf("Filtering on a dead path: %v, want ErrNoAnswer", err)
	}
}

func TestWrongOrigin(t *testing.T) {
	s := startLoopback(t)
	ep := s.Endpoints()
	ep.AltPort = ep.Port + 1 // not where the server really answers from
	if ep.AltPort == s.Endpoints().AltPort {
		ep.AltPort++
	}
	c := &Client{Server: ep, Timeout: 100 * time.Millisecond}
	conn, err := c.Listen(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	a, err := c.Transact(context.Background(), conn, ep.Addr(false, false), false, true)
	if !errors.Is(err, ErrWrongOrigin) {
		t.Fatalf("Transact = %+v, %v; want ErrWrongOrigin", a, err)
	}
	if a.From != netip.AddrPortFrom(ep.Primary, s.Endpoints().AltPort) {
		t.Fatalf("answer from %s", a.From)
	}
}

func TestTransactContext(t *testing.T) {
	s := startLoopback(t)
	c := &Client{Listener: filterListener{nat.FilteringUnknown}, Server: s.Endpoints(), Timeout: time.Second, Attempts: 5}
	conn, err := c.Listen(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = c.Transact(ctx, conn, s.Endpoints().Addr(false, false), false, false)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 800*time.Millisecond {
		t.Fatalf("Transact ignored the context deadline: returned after %v", d)
	}
}

func TestClassifyAllocation(t *testing.T) {
	tests := []struct {
		name    string
		samples []PortPair
		want    nat.Allocation
		delta   int
	}{
		{"preserved", []PortPair{{40000, 40000}, {40001, 40001}, {51234, 51234}}, nat.AllocationPP, 0},
		{"sequential", []PortPair{{40000, 20000}, {40100, 20001}, {50000, 20002}}, nat.AllocationPC, 1},
		{"step two down", []PortPair{{1, 30010}, {2, 30008}, {3, 30006}}, nat.AllocationPC, -2},
		{"wraps", []PortPair{{1, 65534}, {2, 65535}, {3, 0}, {4, 1}}, nat.AllocationPC, 1},
		{"random", []PortPair{{1, 30010}, {2, 1027}, {3, 61000}}, nat.AllocationRD, 0},
		{"uneven", []PortPair{{1, 30010}, {2, 30011}, {3, 30013}}, nat.AllocationRD, 0},
		{"repeated", []PortPair{{1, 30010}, {2, 30010}, {3, 30010}}, nat.AllocationRD, 0},
		{"two samples", []PortPair{{1, 7000}, {2, 7001}}, nat.AllocationRD, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, d := classifyAllocation(tt.samples)
			if got != tt.want || d != tt.delta {
				t.Fatalf("got %s delta %d, want %s delta %d", got, d, tt.want, tt.delta)
			}
		})
	}
}
