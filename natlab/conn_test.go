package natlab_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/natlab"
)

// pair returns two public hosts' sockets on a fresh real-clock network.
func pair(t *testing.T, cfg natlab.Config) (n *natlab.Network, a, b net.PacketConn) {
	t.Helper()
	n = natlab.New(cfg)
	t.Cleanup(func() { n.Close() })
	a = listen(t, n.AddPublicHost("a", pubX), ":1000")
	b = listen(t, n.AddPublicHost("b", pubY), ":2000")
	return n, a, b
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) && errors.As(err, &ne) && ne.Timeout()
}

func TestDeadlines(t *testing.T) {
	buf := make([]byte, 64)
	t.Run("past deadline wins over queued data", func(t *testing.T) {
		_, a, b := pair(t, natlab.Config{})
		send(t, a, at(pubY, 2000), "queued")
		b.SetReadDeadline(time.Now().Add(-time.Second))
		if _, _, err := b.ReadFrom(buf); !isTimeout(err) {
			t.Fatalf("read with past deadline: %v, want a timeout", err)
		}
		b.SetReadDeadline(time.Time{})
		if n, _, err := b.ReadFrom(buf); err != nil || string(buf[:n]) != "queued" {
			t.Fatalf("read after clearing the deadline: %q, %v", buf[:n], err)
		}
	})
	t.Run("future deadline expires", func(t *testing.T) {
		_, _, b := pair(t, natlab.Config{})
		start := time.Now()
		b.SetReadDeadline(start.Add(30 * time.Millisecond))
		_, _, err := b.ReadFrom(buf)
		if !isTimeout(err) {
			t.Fatalf("read: %v, want a timeout", err)
		}
		if el := time.Since(start); el < 30*time.Millisecond {
			t.Errorf("timed out after %v, before the 30 ms deadline", el)
		}
	})
	t.Run("moving the deadline wakes a blocked reader", func(t *testing.T) {
		_, _, b := pair(t, natlab.Config{})
		b.SetReadDeadline(time.Now().Add(time.Hour))
		errc := make(chan error, 1)
		go func() {
			_, _, err := b.ReadFrom(make([]byte, 64))
			errc <- err
		}()
		time.Sleep(5 * time.Millisecond)
		b.SetReadDeadline(time.Now())
		if err := <-errc; !isTimeout(err) {
			t.Fatalf("read: %v, want a timeout", err)
		}
	})
	t.Run("extending the deadline keeps a reader waiting", func(t *testing.T) {
		_, a, b := pair(t, natlab.Config{})
		b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		b.SetReadDeadline(time.Now().Add(time.Hour))
		time.AfterFunc(40*time.Millisecond, func() { a.WriteTo([]byte("late"), net.UDPAddrFromAddrPort(at(pubY, 2000))) })
		if n, _, err := b.ReadFrom(buf); err != nil || string(buf[:n]) != "late" {
			t.Fatalf("read: %q, %v; want the packet sent after the first deadline", buf[:n], err)
		}
	})
	t.Run("write deadline", func(t *testing.T) {
		_, a, _ := pair(t, natlab.Config{})
		a.SetDeadline(time.Now().Add(-time.Second))
		if _, err := a.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(at(pubY, 2000))); !isTimeout(err) {
			t.Fatalf("write with past deadline: %v, want a timeout", err)
		}
		a.SetWriteDeadline(time.Time{})
		send(t, a, at(pubY, 2000), "ok")
	})
	t.Run("fake clock", func(t *testing.T) {
		clk := clock.NewFake(time.Unix(1_700_000_000, 0))
		_, _, b := pair(t, natlab.Config{Clock: clk})
		b.SetReadDeadline(clk.Now().Add(time.Second))
		errc := make(chan error, 1)
		go func() {
			_, _, err := b.ReadFrom(make([]byte, 64))
			errc <- err
		}()
		select {
		case err := <-errc:
			t.Fatalf("read returned before the fake clock moved: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
		clk.Advance(time.Second)
		if err := <-errc; !isTimeout(err) {
			t.Fatalf("read: %v, want a timeout", err)
		}
	})
}

func TestClose(t *testing.T) {
	t.Run("socket", func(t *testing.T) {
		_, _, b := pair(t, natlab.Config{})
		errc := make(chan error, 1)
		go func() {
			_, _, err := b.ReadFrom(make([]byte, 64))
			errc <- err
		}()
		time.Sleep(5 * time.Millisecond)
		if err := b.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := <-errc; !errors.Is(err, net.ErrClosed) {
			t.Fatalf("blocked read after Close: %v, want net.ErrClosed", err)
		}
		if err := b.Close(); !errors.Is(err, net.ErrClosed) {
			t.Errorf("second Close: %v, want net.ErrClosed", err)
		}
		if _, err := b.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(at(pubX, 1000))); !errors.Is(err, net.ErrClosed) {
			t.Errorf("write after Close: %v, want net.ErrClosed", err)
		}
	})
	t.Run("network", func(t *testing.T) {
		n, _, b := pair(t, natlab.Config{})
		errc := make(chan error, 1)
		go func() {
			_, _, err := b.ReadFrom(make([]byte, 64))
			errc <- err
		}()
		time.Sleep(5 * time.Millisecond)
		n.Close()
		if err := <-errc; !errors.Is(err, net.ErrClosed) {
			t.Fatalf("blocked read after network Close: %v, want net.ErrClosed", err)
		}
		if err := n.Close(); err != nil {
			t.Errorf("second network Close: %v", err)
		}
		h := n.AddPublicHost("late", netip.MustParseAddr("203.0.113.77"))
		if _, err := h.ListenPacket(context.Background(), "udp4", ":0"); !errors.Is(err, net.ErrClosed) {
			t.Errorf("ListenPacket on a closed network: %v, want net.ErrClosed", err)
		}
	})
	t.Run("network with packets in flight", func(t *testing.T) {
		n := natlab.New(natlab.Config{})
		a := listen(t, n.AddPublicHost("a", pubX), ":1000")
		b := n.AddPublicHost("b", pubY)
		b.SetLink(natlab.Link{Latency: time.Hour})
		listen(t, b, ":2000")
		send(t, a, at(pubY, 2000), "never")
		n.Close() // must stop the hour-long timer, or goleak complains
	})
}

func TestSocketClosedDrop(t *testing.T) {
	n, a, b := pair(t, natlab.Config{})
	b.Close()
	send(t, a, at(pubY, 2000), "to closed")
	if st := n.Stats(); st.NoListener != 1 {
		t.Errorf("NoListener = %d, want 1", st.NoListener)
	}
}

func TestListenPacket(t *testing.T) {
	n := natlab.New(natlab.Config{})
	defer n.Close()
	h := n.AddPublicHost("h", pubX, pubX2)
	ctx := context.Background()
	listen(t, h, ":4000")
	listen(t, h, pubX.String()+":5000")
	listen(t, h, pubX2.String()+":5000") // same port, other address: fine

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	errCases := []struct {
		name, network, address string
		ctx                    context.Context
		want                   error
	}{
		{"wildcard port in use", "udp4", ":4000", ctx, syscall.EADDRINUSE},
		{"specific port in use under wildcard", "udp4", pubX.String() + ":4000", ctx, syscall.EADDRINUSE},
		{"wildcard over specific", "udp4", ":5000", ctx, syscall.EADDRINUSE},
		{"address not on host", "udp4", "203.0.113.99:0", ctx, syscall.EADDRNOTAVAIL},
		{"cancelled", "udp4", ":0", cancelled, context.Canceled},
	}
	for _, c := range errCases {
		_, err := h.ListenPacket(c.ctx, c.network, c.address)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	for _, bad := range []struct{ network, address string }{
		{"tcp", ":0"}, {"udp6", pubX.String() + ":0"}, {"udp4", "nohost"}, {"udp4", "example.com:1"}, {"udp4", ":99999"},
	} {
		if _, err := h.ListenPacket(ctx, bad.network, bad.address); err == nil {
			t.Errorf("ListenPacket(%q, %q) succeeded", bad.network, bad.address)
		}
	}

	addrs := []struct{ network, address, want string }{
		{"udp4", ":6000", "0.0.0.0:6000"},
		{"udp", ":6001", "[::]:6001"},
		{"udp", pubX2.String() + ":6002", pubX2.String() + ":6002"},
	}
	for _, c := range addrs {
		pc, err := h.ListenPacket(ctx, c.network, c.address)
		if err != nil {
			t.Fatalf("ListenPacket(%q, %q): %v", c.network, c.address, err)
		}
		if got := pc.LocalAddr().String(); got != c.want {
			t.Errorf("ListenPacket(%q, %q).LocalAddr() = %s, want %s", c.network, c.address, got, c.want)
		}
		pc.Close()
	}
}

// TestTwoAddressHost: an RFC 5780 server answers from either of its addresses, and a
// socket bound to one address hears only that address.
func TestTwoAddressHost(t *testing.T) {
	n := natlab.New(natlab.Config{Seed: 1})
	defer n.Close()
	srv := n.AddPublicHost("stun", pubX, pubX2)
	r := n.AddNAT(natlab.NATConfig{Name: "nat", Type: eiEIpp, PublicIP: natA})
	client := listen(t, r.AddHost("client", lanA), ":4000")
	primary := listen(t, srv, pubX.String()+":3478")
	otherIP := listen(t, srv, pubX2.String()+":3478")
	otherPort := listen(t, srv, pubX.String()+":3479")

	send(t, client, at(pubX, 3478), "binding")
	_, mapped := recv(t, primary)
	for _, c := range []struct {
		from net.PacketConn
		want netip.AddrPort
	}{
		{primary, at(pubX, 3478)},
		{otherIP, at(pubX2, 3478)},
		{otherPort, at(pubX, 3479)},
	} {
		send(t, c.from, mapped, "response")
		if _, from := recv(t, client); from != c.want {
			t.Errorf("response from %v, want %v", from, c.want)
		}
	}

	// Exactly one socket gets it: the one bound to the second address.
	if got := delivered(n, func() { send(t, client, at(pubX2, 3478), "second") }); got != 1 {
		t.Fatalf("%d deliveries, want 1", got)
	}
	if msg, _ := recv(t, otherIP); msg != "second" {
		t.Errorf("socket on the second address got %q", msg)
	}

	wild := listen(t, srv, ":5000")
	for _, ip := range srv.Addrs() {
		send(t, client, at(ip, 5000), "to "+ip.String())
		if msg, _ := recv(t, wild); msg != "to "+ip.String() {
			t.Errorf("wildcard socket got %q", msg)
		}
	}
}

func TestQueueFull(t *testing.T) {
	n, a, b := pair(t, natlab.Config{QueueLen: 8})
	for range 20 {
		send(t, a, at(pubY, 2000), "x")
	}
	if st := n.Stats(); st.Delivered != 8 || st.QueueFull != 12 {
		t.Errorf("Delivered %d, QueueFull %d; want 8 and 12", st.Delivered, st.QueueFull)
	}
	for range 8 {
		recv(t, b)
	}
	send(t, a, at(pubY, 2000), "after draining")
	if msg, _ := recv(t, b); msg != "after draining" {
		t.Errorf("got %q", msg)
	}
}

func TestTruncationAndLimits(t *testing.T) {
	_, a, b := pair(t, natlab.Config{})
	send(t, a, at(pubY, 2000), "0123456789")
	buf := make([]byte, 4)
	n, _, err := b.ReadFrom(buf)
	if err != nil || n != 4 || string(buf) != "0123" {
		t.Errorf("short read: %d %q %v, want 4 \"0123\"", n, buf[:n], err)
	}
	if _, err := a.WriteTo(make([]byte, 65508), net.UDPAddrFromAddrPort(at(pubY, 2000))); !errors.Is(err, syscall.EMSGSIZE) {
		t.Errorf("oversized write: %v, want EMSGSIZE", err)
	}
	if _, err := a.WriteTo([]byte("x"), &net.IPAddr{IP: pubY.AsSlice()}); err == nil {
		t.Error("write to a non-UDP address succeeded")
	}
	if _, err := a.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("[2001:db8::1]:1"))); err == nil {
		t.Error("udp4 socket wrote to an IPv6 address")
	}
	if rb, ok := a.(interface{ SetReadBuffer(int) error }); !ok || rb.SetReadBuffer(1<<20) != nil {
		t.Error("SetReadBuffer missing or failing")
	}
}

func TestIPv6(t *testing.T) {
	n := natlab.New(natlab.Config{})
	defer n.Close()
	v6a, v6b := netip.MustParseAddr("2001:db8::a"), netip.MustParseAddr("2001:db8::b")
	a, err := n.AddPublicHost("a", pubX, v6a).ListenPacket(context.Background(), "udp", ":7000")
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b := listen(t, n.AddPublicHost("b", pubY, v6b), ":7000") // udp4: no IPv6
	send(t, a, at(pubY, 7000), "v4")
	if _, from := recv(t, b); from != at(pubX, 7000) {
		t.Errorf("dual-stack socket sent IPv4 from %v", from)
	}
	b6, err := n.AddPublicHost("c", netip.MustParseAddr("2001:db8::c")).ListenPacket(context.Background(), "udp6", ":7000")
	if err != nil {
		t.Fatal(err)
	}
	defer b6.Close()
	send(t, a, at(netip.MustParseAddr("2001:db8::c"), 7000), "v6")
	if _, from := recv(t, b6); from != at(v6a, 7000) {
		t.Errorf("dual-stack socket sent IPv6 from %v", from)
	}
	send(t, b6, at(v6a, 7000), "back")
	if msg, _ := recv(t, a); msg != "back" {
		t.Errorf("got %q", msg)
	}
	send(t, a, at(v6b, 7000), "to a udp4 socket")
	if st := n.Stats(); st.NoListener != 1 {
		t.Errorf("NoListener = %d, want 1 (udp4 socket ignores IPv6)", st.NoListener)
	}
}
