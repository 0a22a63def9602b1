package mux

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/stun"
	"peerlink/stun/stuntest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func listen(t *testing.T, cfg Config) *Mux {
	t.Helper()
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := New(c, cfg)
	t.Cleanup(func() { m.Close() })
	return m
}

func TestBindingAndDataShareTheSocket(t *testing.T) {
	srv := stuntest.Start(t, stuntest.Options{})
	requests := make(chan netip.AddrPort, 1)
	a := listen(t, Config{OnRequest: func(msg []byte, from netip.AddrPort) { requests <- from }})
	b := listen(t, Config{})

	mapped, err := a.Binding(context.Background(), srv.UDPAddr(0), 100*time.Millisecond)
	if err != nil || mapped != a.LocalAddr() {
		t.Fatalf("Binding = %v, %v; want %v", mapped, err, a.LocalAddr())
	}

	// Data from b arrives on a's data path, not as STUN.
	if err := b.WriteTo([]byte("hello"), a.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	a.Data().SetReadDeadline(time.Now().Add(2 * time.Second))
	n, from, err := a.Data().ReadFrom(buf)
	if err != nil || string(buf[:n]) != "hello" || from.(*net.UDPAddr).AddrPort() != b.LocalAddr() {
		t.Fatalf("data ReadFrom = %q from %v, %v", buf[:n], from, err)
	}

	// A STUN request from b goes to a's OnRequest.
	id := stun.NewTransactionID()
	if err := b.WriteTo(stun.AppendBindingRequest(nil, id, stun.RequestOptions{}), a.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	select {
	case from := <-requests:
		if from != b.LocalAddr() {
			t.Errorf("request from %v, want %v", from, b.LocalAddr())
		}
	case <-time.After(2 * time.Second):
		t.Fatal("STUN request not handed to OnRequest")
	}
}

func TestTransactRetransmitsAndTimesOut(t *testing.T) {
	a := listen(t, Config{})
	// A socket that reads but never answers: the transaction must retransmit, then end
	// with the context.
	silent, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	id := stun.NewTransactionID()
	_, _, err = a.Transact(ctx, silent.LocalAddr().(*net.UDPAddr).AddrPort(), id, stun.AppendBindingRequest(nil, id, stun.RequestOptions{}), 50*time.Millisecond)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Transact = %v, want deadline exceeded", err)
	}
	got := 0
	buf := make([]byte, 1500)
	silent.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	for {
		if _, _, err := silent.ReadFrom(buf); err != nil {
			break
		}
		got++
	}
	if got < 3 {
		t.Errorf("%d transmissions in 250ms at a 50ms RTO, want at least 3", got)
	}
}

func TestDeadlineAndClose(t *testing.T) {
	a := listen(t, Config{})
	a.Data().SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, _, err := a.Data().ReadFrom(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadFrom past deadline = %v", err)
	}
	a.Data().SetReadDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() {
		_, _, err := a.Data().ReadFrom(make([]byte, 10))
		errc <- err
	}()
	time.Sleep(10 * time.Millisecond)
	a.Close()
	if err := <-errc; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom after Close = %v, want net.ErrClosed", err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	id := stun.NewTransactionID()
	if _, _, err := a.Transact(context.Background(), a.LocalAddr(), id, nil, time.Second); !errors.Is(err, ErrClosed) {
		t.Errorf("Transact after Close = %v", err)
	}
}
