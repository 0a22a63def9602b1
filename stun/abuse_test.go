package stun_test

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/stun"
	"peerlink/stun/stuntest"
)

// rawRequest is a Binding request with the given attributes (type, value) and no
// FINGERPRINT: the smallest thing an attacker can send.
func rawRequest(attrs ...[2][]byte) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint16(b[0:], 0x0001)
	binary.BigEndian.PutUint32(b[4:], 0x2112A442)
	copy(b[8:20], "abusetxid123")
	for _, a := range attrs {
		v := a[1]
		b = binary.BigEndian.AppendUint16(b, binary.BigEndian.Uint16(a[0]))
		b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
		b = append(b, v...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
	}
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)-20))
	return b
}

func attr(typ uint16, v []byte) [2][]byte {
	return [2][]byte{binary.BigEndian.AppendUint16(nil, typ), v}
}

// TestReflectionAmplification measures what a spoofed request can make the server send
// to its victim: bytes out per byte in, for every request shape the server answers,
// with the largest SOFTWARE it allows. SECURITY.md states the bound this asserts.
func TestReflectionAmplification(t *testing.T) {
	const bound = 4.0 // SECURITY.md: at most 4 bytes out per byte in
	for _, software := range []string{"", fmt.Sprintf("%0128d", 0)} {
		s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{Software: software, RateLimit: noLimit}})
		c := newClient(t)
		change := func(flags byte) [2][]byte { return attr(0x0003, []byte{0, 0, 0, flags}) }
		tests := []struct {
			name string
			req  []byte
		}{
			{"minimal", rawRequest()},
			{"change ip and port", rawRequest(change(0x06))},
			{"change port", rawRequest(change(0x02))},
			{"response port", rawRequest(attr(0x0027, []byte{0x30, 0x39, 0, 0}))},
			{"unknown comprehension-required attributes", rawRequest(attr(0x0007, nil), attr(0x0009, nil), attr(0x000b, nil))},
		}
		for _, tt := range tests {
			c.send(s.UDPAddr(0), tt.req)
			msg, _, ok := c.recv(2 * time.Second)
			if !ok {
				if tt.name == "response port" {
					continue // answered to another port, which this client does not see
				}
				t.Fatalf("%s: no answer", tt.name)
			}
			ratio := float64(len(msg)) / float64(len(tt.req))
			t.Logf("software %3d bytes, %-42s: %3d bytes in, %3d out: %.2f×", len(software), tt.name, len(tt.req), len(msg), ratio)
			if ratio > bound {
				t.Errorf("%s with a %d-byte SOFTWARE: %d bytes answer %d bytes: %.2f×, more than the documented %.0f×", tt.name, len(software), len(msg), len(tt.req), ratio, bound)
			}
		}
	}
}

// TestFloodBoundAndGoodClient floods the server with CHANGE-REQUESTs from one source at
// full speed while another source makes ordinary requests: the flooding source gets no
// more answers than its token bucket allows, and the good client keeps being answered
// quickly.
func TestFloodBoundAndGoodClient(t *testing.T) {
	rl := stun.RateLimit{Rate: 50, Burst: 100, ChangeCost: 5}
	s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{RateLimit: rl}})

	// The attacker sends from 127.0.0.2 so that it is a different source from the good
	// client on 127.0.0.1.
	atk, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.2:0")))
	if err != nil {
		t.Skipf("no second loopback address: %v", err)
	}
	defer atk.Close()
	req := rawRequest(attr(0x0003, []byte{0, 0, 0, 0x06}))
	var sent, gotBytes, got atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { // count what reaches the "victim" (the spoofed source)
		buf := make([]byte, 2048)
		for {
			atk.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, _, err := atk.ReadFromUDPAddrPort(buf)
			if err != nil {
				select {
				case <-stop:
					return
				default:
					continue
				}
			}
			got.Add(1)
			gotBytes.Add(int64(n))
		}
	})
	start := time.Now()
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			for range 64 {
				atk.WriteToUDPAddrPort(req, s.UDPAddr(0))
				sent.Add(1)
			}
			time.Sleep(time.Millisecond)
		}
	})

	good := newClient(t)
	var rtts []time.Duration
	for range 50 {
		t0 := time.Now()
		if _, _, err := good.transactWithin(s.UDPAddr(0), stun.RequestOptions{}, time.Second); err != nil {
			t.Fatalf("good client refused during the flood: %v", err)
		}
		rtts = append(rtts, time.Since(t0))
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	elapsed := time.Since(start)

	// Each CHANGE-REQUEST answer costs ChangeCost tokens: Burst up front, Rate per second.
	allowed := (rl.Burst + rl.Rate*elapsed.Seconds()) / rl.ChangeCost
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	t.Logf("flood: %d requests (%d bytes) in %v; the victim got %d answers (%d bytes, %.4f bytes out per byte in); allowed %.0f",
		sent.Load(), sent.Load()*int64(len(req)), elapsed.Round(time.Millisecond), got.Load(), gotBytes.Load(),
		float64(gotBytes.Load())/float64(sent.Load()*int64(len(req))), allowed)
	t.Logf("good client during the flood: median %v, p98 %v", rtts[len(rtts)/2], rtts[len(rtts)*98/100])
	if float64(got.Load()) > allowed+1 {
		t.Errorf("the flooding source got %d answers, more than its bucket allows (%.0f)", got.Load(), allowed)
	}
	if sent.Load() < 10*int64(allowed) {
		t.Errorf("the flood sent only %d requests: not a flood, the test proves nothing", sent.Load())
	}
	if st := s.Stats(); st.Dropped.RateLimited == 0 {
		t.Errorf("no rate-limited drops counted: %+v", st)
	}
}
