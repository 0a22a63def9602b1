package mux

import (
	"bytes"
	"fmt"
	"net"
	"runtime"
	"testing"
	"time"
)

// wrapped hides a socket's type, as a wrapper that only watches writes does.
type wrapped struct{ net.PacketConn }

func (w wrapped) Unwrap() net.PacketConn { return w.PacketConn }

// TestWriteBatch: a batch arrives as the datagrams it was, in order and intact,
// whether it went as runs of equal-sized segments (GSO on Linux, read back through
// GRO) or one by one: equal sizes, a shorter one ending a run, a longer one starting
// the next, frames back to back in one buffer or scattered.
func TestWriteBatch(t *testing.T) {
	for _, tt := range []struct {
		name       string
		sizes      []int
		contiguous bool
		wrap       bool
	}{
		{"equal", []int{1200, 1200, 1200, 1200}, true, false},
		{"short last", []int{1200, 1200, 1200, 300}, true, false},
		{"runs", []int{1000, 1000, 400, 1300, 1300, 1300, 20, 1300}, false, false},
		{"over 64 segments", func() []int {
			s := make([]int, 100)
			for i := range s {
				s[i] = 600
			}
			return s
		}(), true, true},
		{"one", []int{700}, false, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a, b := listen(t, Config{}), listen(t, Config{})
			sender := a
			if tt.wrap {
				c, err := net.ListenPacket("udp4", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				sender = New(wrapped{c}, Config{})
				t.Cleanup(func() { sender.Close() })
			}
			var want [][]byte
			var backing []byte
			for i, n := range tt.sizes {
				p := bytes.Repeat([]byte{byte(i)}, n)
				copy(p, fmt.Sprintf("#%d", i))
				if tt.contiguous {
					start := len(backing)
					backing = append(backing, p...)
					p = backing[start:len(backing):len(backing)]
				}
				want = append(want, p)
			}
			if tt.contiguous {
				// Re-slice after the appends so every frame shares the final array.
				off := 0
				for i, n := range tt.sizes {
					want[i] = backing[off : off+n : off+n]
					off += n
				}
			}
			if err := sender.WriteBatch(want, b.LocalAddr()); err != nil {
				t.Fatal(err)
			}
			if runtime.GOOS == "linux" && !sender.segmenting() {
				t.Error("the socket fell back to sending datagram by datagram")
			}
			buf := make([]byte, 2048)
			b.Data().SetReadDeadline(time.Now().Add(5 * time.Second))
			for i, w := range want {
				n, _, err := b.Data().ReadFrom(buf)
				if err != nil {
					t.Fatalf("datagram %d of %d: %v", i, len(want), err)
				}
				if !bytes.Equal(buf[:n], w) {
					t.Fatalf("datagram %d: %d bytes starting %q, want %d starting %q", i, n, buf[:min(n, 4)], len(w), w[:min(len(w), 4)])
				}
			}
		})
	}
}
