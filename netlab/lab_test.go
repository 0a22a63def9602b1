package netlab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kernel NAT lab needs root (run as root or via make test)")
	}
	if err := CheckRoot(); err != nil {
		t.Fatalf("running as root, but the lab cannot be built (make test installs its tools): %v", err)
	}
}

// newLab builds a lab that is torn down, and checked for leftovers, when the test ends.
func newLab(t *testing.T, cfg Config) *Lab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		assertGone(t, l)
	})
	return l
}

// assertGone checks that nothing named with the lab's run ID is left.
func assertGone(t *testing.T, l *Lab) {
	t.Helper()
	if left := leftovers(NamePrefix + l.ID + "-"); len(left) > 0 {
		t.Errorf("after Close: %v", left)
	}
	for _, ns := range l.Namespaces() {
		if _, err := os.Stat(netnsDir + "/" + ns); !os.IsNotExist(err) {
			t.Errorf("netns %s still exists (%v)", ns, err)
		}
	}
}

func TestSelfTestEveryKind(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{Sites: SelfTestSites()})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	checks, err := SelfTest(ctx, l, SelfTestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[Kind]int{}
	for _, c := range checks {
		seen[c.Kind]++
		t.Logf("%-16s %-44s claimed %-14s measured %-14s %s | %s", c.Site, c.Router, ClaimString(c.Claimed), ClaimString(c.Measured), c.TCP, c.Evidence)
		if !c.OK() {
			t.Errorf("site %s, router %s, host %s: %v", c.Site, c.Router, c.Host, c.Problems)
		}
		if !SameBehaviour(c.Claimed, c.Measured) && c.OK() {
			t.Errorf("site %s: claimed %s measured %s but no problem reported", c.Site, ClaimString(c.Claimed), ClaimString(c.Measured))
		}
	}
	for _, k := range AllKinds() {
		want := 1
		if k == KindCGNAT {
			want = 2 // the home+carrier path and the carrier alone
		}
		if seen[k] != want {
			t.Errorf("kind %s checked %d times, want %d", k, seen[k], want)
		}
	}
}

// The self-test must be able to fail: swap the full-cone router's rules for stock
// masquerade and it has to notice, naming the router. Stock masquerade filters inbound
// by conntrack (port-dependent) and is not endpoint-independent once two hosts share a
// local port.
func TestSelfTestCatchesStockMasquerade(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{Sites: SelfTestSites(KindFullCone)})
	s := l.Site("full-cone")
	r := s.Routers[0]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stock := "table ip peerlink\ndelete table ip peerlink\n" +
		"table ip peerlink {\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"wan\" masquerade\n\t}\n}\n"
	if err := nftApply(ctx, r.NS, stock); err != nil {
		t.Fatal(err)
	}
	checks, err := SelfTest(ctx, l, SelfTestOptions{Timeout: 200 * time.Millisecond, Attempts: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(checks) != 1 {
		t.Fatalf("%d checks, want 1", len(checks))
	}
	c := checks[0]
	t.Logf("problems reported: %q", c.Problems)
	if c.OK() {
		t.Fatalf("self-test passed stock masquerade as full cone: %s", c.Evidence)
	}
	if c.Measured.Filtering == c.Claimed.Filtering {
		t.Errorf("measured filtering %s, want something stricter than the claimed %s", c.Measured.Filtering, c.Claimed.Filtering)
	}
	if !strings.Contains(c.Router, r.NS) {
		t.Errorf("check names router %q, want its namespace %s", c.Router, r.NS)
	}
	var sawShared bool
	for _, p := range c.Problems {
		sawShared = sawShared || strings.Contains(p, "not endpoint-independent when two hosts share")
	}
	if !sawShared {
		t.Errorf("shared-port check did not catch masquerade's port collision: %q", c.Problems)
	}
}

// udpCounter counts and echoes datagrams.
type udpCounter struct {
	conn net.PacketConn
	n    atomic.Int64
	done chan struct{}
}

func startCounter(t *testing.T, h *Host, addr string) *udpCounter {
	t.Helper()
	conn, err := h.ListenPacket(context.Background(), "udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	u := &udpCounter{conn: conn, done: make(chan struct{})}
	go func() {
		defer close(u.done)
		buf := make([]byte, 1500)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			u.n.Add(1)
			conn.WriteTo(buf[:n], from)
		}
	}()
	t.Cleanup(func() { conn.Close(); <-u.done })
	return u
}

// blast sends n datagrams from h to dst, one a millisecond, and counts the echoes.
func blast(t *testing.T, h *Host, dst net.Addr, n int) (sent int, echoed int) {
	t.Helper()
	conn, err := h.ListenPacket(context.Background(), "udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := make(chan int)
	go func() {
		seen := map[string]bool{}
		buf := make([]byte, 1500)
		for {
			conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			k, _, err := conn.ReadFrom(buf)
			if err != nil {
				got <- len(seen)
				return
			}
			seen[string(buf[:k])] = true
		}
	}()
	for i := range n {
		if _, err := conn.WriteTo([]byte(fmt.Sprintf("probe %d", i)), dst); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	return n, <-got
}

func TestLoss(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{Sites: []SiteConfig{
		{Name: "lossy", Kind: KindNone, Link: Link{Loss: 30}},
		{Name: "clean", Kind: KindPortRestricted},
	}})
	const n = 400
	tests := []struct {
		site      string
		set       int // -1: keep the configured loss
		loss      float64
		tolerance float64
	}{
		{"clean", -1, 0, 0},
		{"lossy", -1, 0.30, 0.10},
		{"lossy", 0, 0, 0},
		{"clean", 100, 1, 0},
		{"clean", 50, 0.5, 0.1},
	}
	for i, tt := range tests {
		t.Run(fmt.Sprintf("%s-%d", tt.site, tt.set), func(t *testing.T) {
			s := l.Site(tt.site)
			if tt.set >= 0 {
				if err := s.SetLoss(context.Background(), tt.set); err != nil {
					t.Fatal(err)
				}
				if s.Link().Loss != tt.set {
					t.Fatalf("Link().Loss = %d after SetLoss(%d)", s.Link().Loss, tt.set)
				}
			}
			port := 9000 + i
			ctr := startCounter(t, l.Server, fmt.Sprintf("%s:%d", l.Server.IP(), port))
			sent, echoed := blast(t, s.Host(), &net.UDPAddr{IP: l.Server.IP().AsSlice(), Port: port}, n)
			arrived := float64(ctr.n.Load()) / float64(sent)
			roundTrip := float64(echoed) / float64(sent)
			keep := 1 - tt.loss
			t.Logf("loss %.0f%%: %.1f%% arrived (want %.1f%%), %.1f%% came back (want %.1f%%)",
				tt.loss*100, arrived*100, keep*100, roundTrip*100, keep*keep*100)
			if math.Abs(arrived-keep) > tt.tolerance {
				t.Errorf("%.1f%% of datagrams arrived one way, want %.0f%% ± %.0f", arrived*100, keep*100, tt.tolerance*100)
			}
			if math.Abs(roundTrip-keep*keep) > tt.tolerance {
				t.Errorf("%.1f%% of datagrams came back, want %.0f%% ± %.0f", roundTrip*100, keep*keep*100, tt.tolerance*100)
			}
		})
	}
	if err := l.Site("clean").SetLoss(context.Background(), 101); err == nil {
		t.Error("SetLoss(101) succeeded")
	}
}

// Two labs at once share no names and do not disturb each other.
func TestTwoLabs(t *testing.T) {
	needRoot(t)
	cfg := Config{Sites: []SiteConfig{{Kind: KindPortRestricted}, {Kind: KindSymmetricSequential}}}
	var labs [2]*Lab
	var wg sync.WaitGroup
	for i := range labs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			l, err := New(ctx, cfg)
			if err != nil {
				t.Error(err)
				return
			}
			labs[i] = l
		})
	}
	wg.Wait()
	for _, l := range labs {
		if l != nil {
			t.Cleanup(func() {
				l.Close()
				assertGone(t, l)
			})
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if labs[0].ID == labs[1].ID {
		t.Fatalf("both labs have run ID %s", labs[0].ID)
	}
	names := map[string]bool{}
	for _, l := range labs {
		for _, ns := range l.Namespaces() {
			if names[ns] {
				t.Fatalf("namespace %s in both labs", ns)
			}
			names[ns] = true
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var results [2][]Check
	for i, l := range labs {
		wg.Go(func() {
			c, err := SelfTest(ctx, l, SelfTestOptions{})
			if err != nil {
				t.Error(err)
			}
			results[i] = c
		})
	}
	wg.Wait()
	for i, cs := range results {
		for _, c := range cs {
			if !c.OK() {
				t.Errorf("lab %s site %s: %v", labs[i].ID, c.Site, c.Problems)
			}
		}
	}
	// Closing one leaves the other working.
	if err := labs[0].Close(); err != nil {
		t.Fatal(err)
	}
	cs, err := SelfTest(ctx, labs[1], SelfTestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if !c.OK() {
			t.Errorf("after closing the other lab, site %s: %v", c.Site, c.Problems)
		}
	}
}

// Down leaves live labs alone, removes a named run, and Close copes afterwards.
func TestDown(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{Sites: []SiteConfig{{Kind: KindFullCone}}})
	ctx := context.Background()
	res, err := Down(ctx, DownOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res.Removed {
		if strings.Contains(r, l.ID) {
			t.Fatalf("Down removed %s of a live lab", r)
		}
	}
	if !slices.Contains(res.Running, l.ID) {
		t.Errorf("Down reported running labs %v, want %s among them", res.Running, l.ID)
	}
	res, err = Down(ctx, DownOptions{RunID: l.ID})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Removed) != len(l.Namespaces()) {
		t.Errorf("Down removed %v, want the lab's %d namespaces", res.Removed, len(l.Namespaces()))
	}
	if left := leftovers(NamePrefix + l.ID + "-"); len(left) > 0 {
		t.Errorf("after Down: %v", left)
	}
	if err := l.Close(); err != nil {
		t.Errorf("Close after Down: %v", err)
	}
}

// A socket the caller forgot would keep a namespace, its veths and nft tables alive
// after `ip netns del`; Close closes it.
func TestCloseClosesLeakedSockets(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{Sites: []SiteConfig{{Kind: KindNone}}})
	h := l.Sites[0].Host()
	pc, err := h.ListenPacket(context.Background(), "udp4", h.IP().String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := h.Listen(context.Background(), "tcp4", h.IP().String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := pc.WriteTo([]byte("x"), pc.LocalAddr()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("packet socket after Close: %v, want net.ErrClosed", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("listener after Close: %v, want net.ErrClosed", err)
	}
	if _, err := h.ListenPacket(context.Background(), "udp4", "0.0.0.0:0"); err == nil {
		t.Error("ListenPacket on a closed lab succeeded")
	}
}

func TestHostRun(t *testing.T) {
	needRoot(t)
	l := newLab(t, Config{Sites: []SiteConfig{{Kind: KindSymmetric}}})
	s := l.Sites[0]
	out, err := s.Host().Run(context.Background(), "ip", "-4", "-o", "addr", "show", "dev", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), s.Host().IP().String()+"/24") {
		t.Errorf("host's eth0: %s, want %s", out, s.Host().IP())
	}
	if _, err := s.Routers[0].Run(context.Background(), "ip", "link", "show", "dev", "nonexistent0"); err == nil {
		t.Error("Run of a failing command returned no error")
	} else if ce := (*CmdError)(nil); !errors.As(err, &ce) {
		t.Errorf("Run error %T, want *CmdError", err)
	}
}

func TestDelay(t *testing.T) {
	needRoot(t)
	const delay = 40 * time.Millisecond
	l := newLab(t, Config{Sites: []SiteConfig{
		{Name: "slow", Kind: KindNone, Link: Link{Delay: delay}},
		{Name: "slownat", Kind: KindPortRestricted, Link: Link{Delay: delay, Loss: 0}},
		{Name: "fast", Kind: KindNone},
	}})
	startCounter(t, l.Server, l.Server.IP().String()+":7000")
	dst := &net.UDPAddr{IP: l.Server.IP().AsSlice(), Port: 7000}
	rtt := func(h *Host) time.Duration {
		conn, err := h.ListenPacket(context.Background(), "udp4", "0.0.0.0:0")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		best := time.Hour
		buf := make([]byte, 100)
		for range 5 {
			start := time.Now()
			conn.WriteTo([]byte("ping"), dst)
			conn.SetReadDeadline(time.Now().Add(time.Second))
			if _, _, err := conn.ReadFrom(buf); err != nil {
				t.Fatalf("%s: no echo: %v", h.Name, err)
			}
			best = min(best, time.Since(start))
		}
		return best
	}
	for _, tt := range []struct {
		site     string
		min, max time.Duration
	}{
		{"slow", 2 * delay, 2*delay + 40*time.Millisecond},
		{"slownat", 2 * delay, 2*delay + 40*time.Millisecond},
		{"fast", 0, 10 * time.Millisecond},
	} {
		got := rtt(l.Site(tt.site).Host())
		t.Logf("%s: round trip %v", tt.site, got)
		if got < tt.min || got > tt.max {
			t.Errorf("%s: round trip %v, want %v-%v", tt.site, got, tt.min, tt.max)
		}
	}

	// Bulk TCP through the relay: segmentation offload and checksums must survive it.
	ln, err := l.Server.Listen(context.Background(), "tcp4", l.Server.IP().String()+":8000")
	if err != nil {
		t.Fatal(err)
	}
	const size = 4 << 20
	recv := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			recv <- -1
			return
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		recv <- n
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := l.Site("slownat").Host().DialContext(ctx, "tcp4", l.Server.IP().String()+":8000")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := <-recv; n != size {
		t.Fatalf("server received %d bytes, want %d", n, size)
	}
	ln.Close()
	t.Logf("4 MiB over TCP through the %v relay in %v", delay, time.Since(start).Round(time.Millisecond))

	checks, err := SelfTest(ctx, l, SelfTestOptions{Timeout: 400 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range checks {
		if !c.OK() {
			t.Errorf("site %s behind a delayed link: %v", c.Site, c.Problems)
		}
	}
}
