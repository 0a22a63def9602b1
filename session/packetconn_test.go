package session

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"peerlink/connect"
)

func TestPacketConn(t *testing.T) {
	w := newWorld(t, 30)
	a, b := w.node("a", "ei-pd-pp", connect.PathCheck{}), w.node("b", "ei-pd-pp", connect.PathCheck{})
	ca, cb := connPair(t, a, b, connect.MethodPunched)
	pa, pb := NewPacketConn(ca, a.NodeID()), NewPacketConn(cb, b.NodeID())
	defer pa.Close()
	defer pb.Close()
	if pa.RemoteAddr().String() != b.NodeID().String() || pa.LocalAddr().Network() != "peerlink" {
		t.Errorf("addresses %v → %v", pa.LocalAddr(), pa.RemoteAddr())
	}

	// A full-size QUIC packet crosses (connect adds its header; nothing may cut it).
	big := make([]byte, 1452)
	for i := range big {
		big[i] = byte(i)
	}
	buf := make([]byte, 2048)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := pa.WriteTo(big, nil); err != nil {
			t.Fatal(err)
		}
		pb.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, from, err := pb.ReadFrom(buf)
		if err == nil {
			if n != len(big) || string(buf[:n]) != string(big) || from.String() != a.NodeID().String() {
				t.Fatalf("read %d bytes from %v, want %d from a", n, from, len(big))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing arrived: %v", err)
		}
	}

	tests := []struct {
		name  string
		setup func()           // before the read starts
		while func()           // 50 ms into a blocked read
		check func(error) bool // on the read's error
	}{
		{"deadline passed", func() { pb.SetReadDeadline(time.Now().Add(-time.Second)) }, nil, isTimeout},
		{"deadline ahead", func() { pb.SetReadDeadline(time.Now().Add(100 * time.Millisecond)) }, nil, isTimeout},
		{"deadline moved nearer while blocked", func() { pb.SetReadDeadline(time.Time{}) }, func() { pb.SetReadDeadline(time.Now()) }, isTimeout},
		{"closed while blocked", func() { pb.SetReadDeadline(time.Time{}) }, func() { pb.Close() }, func(err error) bool { return errors.Is(err, net.ErrClosed) }},
		{"read after close", nil, nil, func(err error) bool { return errors.Is(err, net.ErrClosed) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.setup != nil {
				tt.setup()
			}
			if tt.while != nil {
				time.AfterFunc(50*time.Millisecond, tt.while)
			}
			start := time.Now()
			_, _, err := pb.ReadFrom(buf)
			if !tt.check(err) {
				t.Errorf("read: %v", err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("read took %v", d)
			}
		})
	}
	if err := pb.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := pb.WriteTo([]byte("x"), nil); !errors.Is(err, net.ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
	pa.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := pa.WriteTo([]byte("x"), nil); !isTimeout(err) {
		t.Errorf("write past its deadline: %v", err)
	}
	// The connection under a PacketConn is still the caller's.
	ca.Close()
	pa.SetReadDeadline(time.Time{})
	if _, _, err := pa.ReadFrom(buf); !errors.Is(err, net.ErrClosed) || !errors.Is(err, connect.ErrClosed) {
		t.Errorf("read after the connection closed: %v", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() && errors.Is(err, os.ErrDeadlineExceeded)
}
