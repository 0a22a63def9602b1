package natlab_test

import (
	"net"
	"strconv"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/natlab"
)

// TestLoss sends 2000 packets over a link with 10% loss (and the edge rates) and
// checks the share that arrives.
func TestLoss(t *testing.T) {
	const total = 2000
	cases := []struct {
		name     string
		loss     float64
		onUplink bool
		min, max int
	}{
		// 10% of 2000: mean 1800 arriving, standard deviation about 13.
		{"uplink 10%", 0.1, true, 1740, 1860},
		{"host link 10%", 0.1, false, 1740, 1860},
		{"none", 0, true, total, total},
		{"all", 1, true, 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := natlab.New(natlab.Config{Seed: 11, QueueLen: total})
			defer n.Close()
			r := n.AddNAT(natlab.NATConfig{Name: "nat", Type: eiEIpp, PublicIP: natA})
			h := r.AddHost("inside", lanA)
			if c.onUplink {
				r.SetUplink(natlab.Link{Loss: c.loss})
			} else {
				h.SetLink(natlab.Link{Loss: c.loss})
			}
			s := listen(t, h, ":4000")
			x1 := listen(t, n.AddPublicHost("x", pubX), ":3478")
			for i := range total {
				send(t, s, at(pubX, 3478), strconv.Itoa(i))
			}
			got := int(n.Stats().Delivered)
			for range got {
				recv(t, x1)
			}
			if got < c.min || got > c.max {
				t.Errorf("%d of %d arrived, want %d..%d", got, total, c.min, c.max)
			}
			if st := n.Stats(); int(st.Lost) != total-got || st.Dropped() != st.Lost {
				t.Errorf("Lost = %d, Dropped = %d; want both %d", st.Lost, st.Dropped(), total-got)
			}
			if c.onUplink {
				if lost := r.Stats().Lost; int(lost) != total-got {
					t.Errorf("NAT's Lost = %d, want %d", lost, total-got)
				}
			}
			t.Logf("%d of %d arrived", got, total)
		})
	}
}

// TestLatency checks on a fake clock that a packet crossing a host link (10 ms) and a
// NAT uplink (50 ms) arrives after exactly 60 ms, in each direction.
func TestLatency(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	n := natlab.New(natlab.Config{Seed: 1, Clock: clk})
	defer n.Close()
	r := n.AddNAT(natlab.NATConfig{Name: "nat", Type: eiEIpp, PublicIP: natA, Uplink: natlab.Link{Latency: 50 * time.Millisecond}})
	h := r.AddHost("inside", lanA)
	h.SetLink(natlab.Link{Latency: 10 * time.Millisecond})
	s := listen(t, h, ":4000")
	x1 := listen(t, n.AddPublicHost("x", pubX), ":3478")

	oneWay := func(from, to net.PacketConn, dst string) {
		t.Helper()
		ap := at(pubX, 3478)
		if dst == "in" {
			ap = at(natA, 4000)
		}
		if got := delivered(n, func() { send(t, from, ap, "ping") }); got != 0 {
			t.Fatalf("%s: delivered at once over a 60 ms path", dst)
		}
		if got := delivered(n, func() { clk.Advance(59 * time.Millisecond) }); got != 0 {
			t.Fatalf("%s: delivered after 59 ms over a 60 ms path", dst)
		}
		if got := delivered(n, func() { clk.Advance(time.Millisecond) }); got != 1 {
			t.Fatalf("%s: not delivered after 60 ms", dst)
		}
		readQueued(t, to)
	}
	oneWay(s, x1, "out")
	oneWay(x1, s, "in")
	if p := clk.Pending(); p != 0 {
		t.Errorf("%d timers left pending", p)
	}
}

// TestJitter checks on a fake clock that delays spread over [Latency, Latency+Jitter]
// and that packets may be reordered.
func TestJitter(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	n := natlab.New(natlab.Config{Seed: 2, Clock: clk})
	defer n.Close()
	r := n.AddNAT(natlab.NATConfig{Name: "nat", Type: eiEIpp, PublicIP: natA,
		Uplink: natlab.Link{Latency: 20 * time.Millisecond, Jitter: 10 * time.Millisecond}})
	s := listen(t, r.AddHost("inside", lanA), ":4000")
	x1 := listen(t, n.AddPublicHost("x", pubX), ":3478")
	const total = 200
	for i := range total {
		send(t, s, at(pubX, 3478), strconv.Itoa(i))
	}
	arrivals := map[time.Duration]int{}
	var order []int
	for ms := time.Duration(0); ms <= 40; ms++ {
		got := delivered(n, func() { clk.Advance(time.Millisecond) })
		if got > 0 {
			arrivals[(ms+1)*time.Millisecond] += int(got)
		}
		for range got {
			msg, _ := readQueued(t, x1)
			i, _ := strconv.Atoi(msg)
			order = append(order, i)
		}
	}
	if len(order) != total {
		t.Fatalf("%d of %d arrived", len(order), total)
	}
	for d, k := range arrivals {
		if d < 20*time.Millisecond || d > 30*time.Millisecond {
			t.Errorf("%d packets arrived after %v, outside 20-30 ms", k, d)
		}
	}
	reordered := 0
	for i := 1; i < len(order); i++ {
		if order[i] < order[i-1] {
			reordered++
		}
	}
	if reordered == 0 {
		t.Error("no reordering with 10 ms jitter")
	}
	t.Logf("arrivals by time: %v; %d reorderings", arrivals, reordered)
}
