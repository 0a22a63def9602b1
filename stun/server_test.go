package stun_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/nettype"
	"peerlink/stun"
	"peerlink/stun/stuntest"
)

var noLimit = stun.RateLimit{Disabled: true}

// client is a real UDP socket on 127.0.0.1.
type client struct {
	t    testing.TB
	conn *net.UDPConn
	buf  []byte
}

func newClient(t testing.TB) *client {
	t.Helper()
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, conn: c, buf: make([]byte, 4096)}
}

func (c *client) addr() netip.AddrPort { return c.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

func (c *client) send(to netip.AddrPort, b []byte) {
	c.t.Helper()
	if _, err := c.conn.WriteToUDPAddrPort(b, to); err != nil {
		c.t.Fatal(err)
	}
}

// recv waits up to d for a datagram; ok is false on timeout.
func (c *client) recv(d time.Duration) (msg []byte, from netip.AddrPort, ok bool) {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(d))
	n, from, err := c.conn.ReadFromUDPAddrPort(c.buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, from, false
		}
		c.t.Fatal(err)
	}
	return c.buf[:n], from, true
}

// transact sends a Binding request and returns the parsed answer and its source.
func (c *client) transact(to netip.AddrPort, opts stun.RequestOptions) (stun.BindingResponse, netip.AddrPort, error) {
	c.t.Helper()
	id := stun.NewTransactionID()
	c.send(to, stun.AppendBindingRequest(nil, id, opts))
	for {
		msg, from, ok := c.recv(2 * time.Second)
		if !ok {
			return stun.BindingResponse{}, from, errors.New("no answer")
		}
		r, err := stun.ParseBindingResponse(msg)
		if r.TransactionID != id {
			continue // a late answer to an earlier request
		}
		return r, from, err
	}
}

// TestServerRFC5780Sockets sends every CHANGE-REQUEST to every one of the four sockets of
// a real loopback server and checks which socket answers.
func TestServerRFC5780Sockets(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{RateLimit: noLimit, Software: "peerlink-test"}})
	c := newClient(t)
	addr := func(i int) netip.AddrPort { return s.UDPAddr(stun.ChangeRequest(i << 1)) }
	if addr(1).Addr() != addr(0).Addr() || addr(2).Port() != addr(0).Port() || addr(3).Addr() != stuntest.AltIP || addr(3).Port() != addr(1).Port() {
		t.Fatalf("addresses %v %v %v %v do not form IP1:P1 IP1:P2 IP2:P1 IP2:P2", addr(0), addr(1), addr(2), addr(3))
	}
	for on := range 4 {
		for _, ch := range []stun.ChangeRequest{0, stun.ChangePort, stun.ChangeIP, stun.ChangeIP | stun.ChangePort} {
			r, from, err := c.transact(addr(on), stun.RequestOptions{Change: ch})
			if err != nil {
				t.Fatalf("to %v, change %v: %v", addr(on), ch, err)
			}
			want := addr(on ^ int(ch>>1))
			if from != want || r.Origin != want {
				t.Errorf("to %v, change %v: from %v (RESPONSE-ORIGIN %v), want %v", addr(on), ch, from, r.Origin, want)
			}
			if r.Other != addr(on^3) {
				t.Errorf("to %v: OTHER-ADDRESS %v, want %v", addr(on), r.Other, addr(on^3))
			}
			if r.Mapped != c.addr() || !r.MappedXOR || r.PlainMapped != c.addr() {
				t.Errorf("mapped %v (xor %v, plain %v), want %v", r.Mapped, r.MappedXOR, r.PlainMapped, c.addr())
			}
			if r.Software != "peerlink-test" {
				t.Errorf("software %q", r.Software)
			}
		}
	}
	st := s.Stats()
	if st.Responses != 16 || st.ChangedResponses != 12 || st.Requests != 16 {
		t.Errorf("stats %+v, want 16 requests and responses, 12 changed", st)
	}
}

func TestServerSingleAddress(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{Config: stun.Config{RateLimit: noLimit}})
	if s.RFC5780() || s.UDPAddr(stun.ChangeIP).IsValid() {
		t.Fatal("single-address server claims RFC 5780")
	}
	c := newClient(t)
	r, from, err := c.transact(s.UDPAddr(0), stun.RequestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if from != s.UDPAddr(0) || r.Mapped != c.addr() || r.Other.IsValid() || r.Origin.IsValid() || r.PlainMapped.IsValid() {
		t.Errorf("answer %+v from %v: want only XOR-MAPPED-ADDRESS %v", r, from, c.addr())
	}
	for _, ch := range []stun.ChangeRequest{stun.ChangeIP, stun.ChangePort} {
		_, from, err = c.transact(s.UDPAddr(0), stun.RequestOptions{Change: ch})
		var re *stun.ResponseError
		if !errors.As(err, &re) || re.Code != 420 || len(re.Unknown) != 1 || re.Unknown[0] != 0x0003 {
			t.Errorf("CHANGE-REQUEST %v: %v, want 420 listing CHANGE-REQUEST", ch, err)
		}
		if from != s.UDPAddr(0) {
			t.Errorf("error answered from %v", from)
		}
	}
}

// wrapListener hides the *net.UDPConn behind a plain net.PacketConn, the way an emulated
// network's sockets look, so the server takes its portable loop.
type wrapListener struct{ nettype.Std }

type wrappedConn struct{ net.PacketConn }

func (w wrapListener) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	c, err := w.Std.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return wrappedConn{c}, nil
}

// TestServerPortableLoop runs the four-socket test on the loops used off Linux and on
// emulated networks.
func TestServerPortableLoop(t *testing.T) {
	for name, l := range map[string]nettype.PacketListener{"std": nettype.Std{}, "wrapped": wrapListener{}} {
		t.Run(name, func(t *testing.T) {
			s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{Net: l, RateLimit: noLimit, TCP: true}})
			c := newClient(t)
			for _, ch := range []stun.ChangeRequest{0, stun.ChangePort, stun.ChangeIP, stun.ChangeIP | stun.ChangePort} {
				r, from, err := c.transact(s.UDPAddr(0), stun.RequestOptions{Change: ch})
				if err != nil {
					t.Fatalf("change %v: %v", ch, err)
				}
				if from != s.UDPAddr(ch) || r.Origin != from || r.Mapped != c.addr() {
					t.Errorf("change %v: from %v origin %v mapped %v", ch, from, r.Origin, r.Mapped)
				}
			}
			tcpTransact(t, s.TCPAddr(), stun.RequestOptions{})
		})
	}
}

func tcpTransact(t *testing.T, to netip.AddrPort, opts stun.RequestOptions) (stun.BindingResponse, error) {
	t.Helper()
	conn, err := net.Dial("tcp", to.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(stun.AppendBindingRequest(nil, stun.NewTransactionID(), opts)); err != nil {
		t.Fatal(err)
	}
	msg, err := stun.ReadMessage(conn, make([]byte, 2048))
	if err != nil {
		t.Fatal(err)
	}
	return stun.ParseBindingResponse(msg)
}

func TestServerTCP(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{TCP: true, RateLimit: noLimit}})
	if s.TCPAddr() != s.UDPAddr(0) {
		t.Fatalf("TCP %v, UDP %v: want the same address", s.TCPAddr(), s.UDPAddr(0))
	}
	conn, err := net.Dial("tcp", s.TCPAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	local := conn.LocalAddr().(*net.TCPAddr).AddrPort()

	// Three requests in one write, then one a byte at a time.
	ids := []stun.TransactionID{stun.NewTransactionID(), stun.NewTransactionID(), stun.NewTransactionID(), stun.NewTransactionID()}
	var burst []byte
	for _, id := range ids[:3] {
		burst = stun.AppendBindingRequest(burst, id, stun.RequestOptions{})
	}
	if _, err := conn.Write(burst); err != nil {
		t.Fatal(err)
	}
	for _, b := range stun.AppendBindingRequest(nil, ids[3], stun.RequestOptions{Change: stun.ChangeIP}) {
		if _, err := conn.Write([]byte{b}); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 2048)
	for i, id := range ids {
		msg, err := stun.ReadMessage(conn, buf)
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		r, err := stun.ParseBindingResponse(msg)
		if r.TransactionID != id {
			t.Fatalf("answer %d for %x, want %x", i, r.TransactionID, id)
		}
		if i == 3 {
			// A TCP answer cannot come from another address.
			var re *stun.ResponseError
			if !errors.As(err, &re) || re.Code != 420 {
				t.Errorf("CHANGE-REQUEST over TCP: %v, want 420", err)
			}
			continue
		}
		if err != nil || r.Mapped != local || r.Other.IsValid() {
			t.Errorf("answer %d: %+v, %v; want mapped %v and no OTHER-ADDRESS", i, r, err, local)
		}
	}
	// Anything that is not STUN ends the connection.
	if _, err := conn.Write([]byte("GET / HTTP/1.1\r\nHost: stun\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	// The server closes with the rest of the request unread, so the close may arrive as
	// a reset.
	if n, err := conn.Read(buf); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("after non-STUN: read %d bytes, %v; want the connection closed", n, err)
	}
	st := s.Stats()
	if st.Dropped.NotSTUN != 1 || st.Responses != 3 || st.UnknownAttribute != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestServerTCPConnLimit(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{Config: stun.Config{TCP: true, MaxTCPConns: 2, RateLimit: noLimit}})
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 2 {
		c, err := net.Dial("tcp", s.TCPAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		// An answer proves the server has accepted and tracks the connection.
		c.Write(stun.AppendBindingRequest(nil, stun.NewTransactionID(), stun.RequestOptions{}))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := stun.ReadMessage(c, make([]byte, 2048)); err != nil {
			t.Fatal(err)
		}
	}
	third, err := net.Dial("tcp", s.TCPAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	third.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := third.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("third connection: %v, want EOF", err)
	}
	if n := s.Stats().Dropped.TCPConnLimit; n != 1 {
		t.Errorf("TCPConnLimit %d, want 1", n)
	}
}

func TestServerRateLimit(t *testing.T) {
	fake := clock.NewFake(time.Unix(1e9, 0))
	s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{
		Clock:     fake,
		RateLimit: stun.RateLimit{Rate: 1, Burst: 6, ChangeCost: 4},
	}})
	c := newClient(t)
	answered := func(ch stun.ChangeRequest) bool {
		_, _, err := c.transactWithin(s.UDPAddr(0), stun.RequestOptions{Change: ch}, 300*time.Millisecond)
		return err == nil
	}
	if !answered(stun.ChangeIP) || !answered(0) || !answered(0) {
		t.Fatal("refused within the burst")
	}
	if answered(0) {
		t.Fatal("answered beyond the burst")
	}
	fake.Advance(4 * time.Second)
	if !answered(stun.ChangePort) {
		t.Error("CHANGE-REQUEST refused after earning 4 tokens")
	}
	if answered(0) {
		t.Error("answered with an empty bucket")
	}
	st := s.Stats()
	if st.Dropped.RateLimited != 2 || st.Responses != 4 {
		t.Errorf("stats %+v, want 4 responses and 2 rate-limited", st)
	}
}

// transactWithin is transact with a shorter wait, for requests that may get silence.
func (c *client) transactWithin(to netip.AddrPort, opts stun.RequestOptions, d time.Duration) (stun.BindingResponse, netip.AddrPort, error) {
	id := stun.NewTransactionID()
	c.send(to, stun.AppendBindingRequest(nil, id, opts))
	msg, from, ok := c.recv(d)
	if !ok {
		return stun.BindingResponse{}, from, errors.New("no answer")
	}
	r, err := stun.ParseBindingResponse(msg)
	return r, from, err
}

// TestServerBadInputThenAnswer sends noise, oversized and malformed datagrams, then a
// valid request: only the malformed STUN request and the valid one get answers.
func TestServerBadInputThenAnswer(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{Config: stun.Config{RateLimit: noLimit}})
	c := newClient(t)
	valid := stun.AppendBindingRequest(nil, stun.NewTransactionID(), stun.RequestOptions{})
	badFP := append([]byte(nil), valid...)
	badFP[len(badFP)-1] ^= 0xff
	flood := append([]byte(nil), valid[:20]...)
	for range 400 {
		flood = append(flood, 0x80, 0x00, 0x00, 0x00) // empty optional attributes
	}
	flood[2], flood[3] = byte((len(flood)-20)>>8), byte(len(flood)-20)
	for _, noise := range [][]byte{
		[]byte("\x16\xfe\xfd DTLS-ish"),
		make([]byte, 3000), // larger than any STUN message the server reads
		valid[:19],
		valid[:len(valid)-4],
		badFP,
		make([]byte, 1),
		append(append([]byte(nil), valid...), 0, 0, 0, 0),
	} {
		c.send(s.UDPAddr(0), noise)
	}
	if msg, _, ok := c.recv(300 * time.Millisecond); ok {
		t.Fatalf("noise answered with % x", msg)
	}
	if _, _, err := c.transact(s.UDPAddr(0), stun.RequestOptions{}); err != nil {
		t.Fatalf("valid request after noise: %v", err)
	}
	c.send(s.UDPAddr(0), flood)
	msg, _, ok := c.recv(2 * time.Second)
	if !ok {
		t.Fatal("attribute flood not answered")
	}
	if r, err := stun.ParseBindingResponse(msg); err != nil || r.Mapped != c.addr() {
		t.Errorf("attribute flood: %+v %v", r, err)
	}
	st := s.Stats()
	if st.Dropped.NotSTUN != 7 || st.Responses != 2 {
		t.Errorf("stats %+v, want 7 not-STUN and 2 responses", st)
	}
	checkStatsAddUp(t, st)
}

func checkStatsAddUp(t *testing.T, st stun.Stats) {
	t.Helper()
	if st.Received != st.Requests+st.Dropped.NotSTUN+st.Dropped.Ignored {
		t.Errorf("received %d != requests %d + not-STUN %d + ignored %d", st.Received, st.Requests, st.Dropped.NotSTUN, st.Dropped.Ignored)
	}
	if st.Requests != st.Responses+st.BadRequest+st.UnknownAttribute+st.Dropped.RateLimited+st.Dropped.Forbidden {
		t.Errorf("requests %d do not add up: %+v", st.Requests, st)
	}
}

// TestServerManyClients keeps many requests in flight from many sockets, so the batched
// reads and writes and every SO_REUSEPORT socket take part.
func TestServerManyClients(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{RateLimit: noLimit, SocketsPerAddr: 3}})
	const clients, window, rounds = 16, 8, 5
	var wg sync.WaitGroup
	var mu sync.Mutex
	answered := 0
	for range clients {
		c := newClient(t)
		wg.Go(func() {
			got := 0
			for r := range rounds {
				ch := stun.ChangeRequest(r%4) << 1
				for range window {
					c.send(s.UDPAddr(0), stun.AppendBindingRequest(nil, stun.NewTransactionID(), stun.RequestOptions{Change: ch}))
				}
				for range window {
					msg, from, ok := c.recv(2 * time.Second)
					if !ok {
						break
					}
					if r, err := stun.ParseBindingResponse(msg); err == nil && r.Mapped == c.addr() && from == s.UDPAddr(ch) {
						got++
					}
				}
			}
			mu.Lock()
			answered += got
			mu.Unlock()
		})
	}
	wg.Wait()
	if want := clients * window * rounds; answered != want {
		t.Errorf("%d right answers, want %d", answered, want)
	}
	checkStatsAddUp(t, s.Stats())
}

// TestServerWildcard listens on every address: the dual-stack socket must answer IPv4
// clients (and IPv6 ones where the host has ::1).
func TestServerWildcard(t *testing.T) {
	s := stuntest.Start(t, stuntest.Options{Config: stun.Config{Listen: ":0", RateLimit: noLimit}})
	port := s.UDPAddr(0).Port()
	c := newClient(t)
	r, _, err := c.transact(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port), stun.RequestOptions{})
	if err != nil || r.Mapped != c.addr() {
		t.Fatalf("IPv4 client: %+v %v", r, err)
	}
	c6, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	defer c6.Close()
	cl := &client{t: t, conn: c6, buf: make([]byte, 2048)}
	r, _, err = cl.transact(netip.AddrPortFrom(netip.IPv6Loopback(), port), stun.RequestOptions{})
	if err != nil || r.Mapped != cl.addr() {
		t.Fatalf("IPv6 client: %+v %v", r, err)
	}
}

func TestServerLifecycle(t *testing.T) {
	ctx := context.Background()
	s, err := stun.Listen(ctx, stun.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	// Close before Serve: Serve then refuses.
	s.Close()
	s.Close()
	if err := s.Serve(ctx); !errors.Is(err, stun.ErrServerClosed) {
		t.Errorf("Serve after Close: %v", err)
	}

	// Cancelling Serve's context stops it; Serve returns nil and the port is free again.
	s, err = stun.Listen(ctx, stun.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Serve(cctx) }()
	c := newClient(t)
	if _, _, err := c.transact(s.UDPAddr(0), stun.RequestOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(ctx); err == nil {
		t.Error("second Serve did not fail")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
	s.Close()
	again, err := stun.Listen(ctx, stun.Config{Listen: s.UDPAddr(0).String()})
	if err != nil {
		t.Fatalf("port not released: %v", err)
	}
	again.Close()
}

func TestListenConfigErrors(t *testing.T) {
	alt := netip.MustParseAddr("127.0.0.2")
	for name, cfg := range map[string]stun.Config{
		"AltIP with wildcard Listen":  {Listen: ":0", AltIP: alt},
		"AltIP of another family":     {Listen: "127.0.0.1:0", AltIP: netip.IPv6Loopback()},
		"AltIP equal to Listen":       {Listen: "127.0.0.1:0", AltIP: netip.MustParseAddr("127.0.0.1")},
		"AltPort equal to port":       {Listen: "127.0.0.1:4000", AltIP: alt, AltPort: 4000},
		"no port after 65535":         {Listen: "127.0.0.1:65535", AltIP: alt},
		"bad Listen":                  {Listen: "127.0.0.1"},
		"bad port":                    {Listen: "127.0.0.1:http"},
		"long SOFTWARE":               {Listen: "127.0.0.1:0", Software: string(make([]byte, 129))},
		"TCP on a Net without Listen": {Listen: "127.0.0.1:0", TCP: true, Net: wrapListenerNoTCP{}},
	} {
		s, err := stun.Listen(context.Background(), cfg)
		if !errors.Is(err, stun.ErrConfig) {
			t.Errorf("%s: %v, want ErrConfig", name, err)
		}
		if s != nil {
			s.Close()
		}
	}
}

type wrapListenerNoTCP struct{}

func (wrapListenerNoTCP) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	return nettype.Std{}.ListenPacket(ctx, network, address)
}

// flakyListener refuses the first binds on the alternate IP, the way a port the system
// picked on one IP can be taken on the other.
type flakyListener struct {
	mu      sync.Mutex
	refusal int
}

func (f *flakyListener) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if strings.HasPrefix(address, stuntest.AltIP.String()+":") && f.refusal < 3 {
		f.refusal++
		return nil, syscall.EADDRINUSE
	}
	return nettype.Std{}.ListenPacket(ctx, network, address)
}

func TestListenRetriesEphemeralPorts(t *testing.T) {
	f := &flakyListener{}
	s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{Net: f, RateLimit: noLimit}})
	if f.refusal != 3 {
		t.Fatalf("%d refusals, want 3", f.refusal)
	}
	c := newClient(t)
	if _, from, err := c.transact(s.UDPAddr(0), stun.RequestOptions{Change: stun.ChangeIP}); err != nil || from != s.UDPAddr(stun.ChangeIP) {
		t.Fatalf("after retries: from %v, %v", from, err)
	}
	// Fixed ports are not retried.
	free := newClient(t)
	port := free.addr().Port()
	free.conn.Close()
	s2, err := stun.Listen(context.Background(), stun.Config{Listen: netip.AddrPortFrom(free.addr().Addr(), port).String(), AltIP: stuntest.AltIP, Net: &flakyListener{refusal: 2}})
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("fixed ports: %v, want EADDRINUSE", err)
	}
	if s2 != nil {
		s2.Close()
	}
}
