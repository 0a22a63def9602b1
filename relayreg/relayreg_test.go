package relayreg

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/store"
	"peerlink/store/memstore"
	"peerlink/stun/stuntest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newID(t *testing.T) identity.NodeID {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id.NodeID()
}

func TestValidate(t *testing.T) {
	id := newID(t)
	ep := []Endpoint{{UDP, "192.0.2.1:3478"}}
	tests := []struct {
		name string
		info Info
		ok   bool
	}{
		{"good", Info{NodeID: id, Endpoints: ep, Capacity: 10, Load: 3}, true},
		{"name host", Info{NodeID: id, Endpoints: []Endpoint{{TLS, "relay.example:443"}}}, true},
		{"ipv6", Info{NodeID: id, Endpoints: []Endpoint{{TCP, "[2001:db8::1]:443"}}}, true},
		{"no id", Info{Endpoints: ep}, false},
		{"no endpoints", Info{NodeID: id}, false},
		{"too many endpoints", Info{NodeID: id, Endpoints: make([]Endpoint, MaxEndpoints+1)}, false},
		{"bad transport", Info{NodeID: id, Endpoints: []Endpoint{{"quic", "192.0.2.1:1"}}}, false},
		{"no port", Info{NodeID: id, Endpoints: []Endpoint{{UDP, "192.0.2.1"}}}, false},
		{"port zero", Info{NodeID: id, Endpoints: []Endpoint{{UDP, "192.0.2.1:0"}}}, false},
		{"port too big", Info{NodeID: id, Endpoints: []Endpoint{{UDP, "192.0.2.1:65536"}}}, false},
		{"no host", Info{NodeID: id, Endpoints: []Endpoint{{UDP, ":3478"}}}, false},
		{"negative load", Info{NodeID: id, Endpoints: ep, Load: -1}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.info.Validate()
			if (err == nil) != tt.ok {
				t.Fatalf("Validate = %v, want ok=%v", err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
		})
	}
}

func TestRegistryTTL(t *testing.T) {
	fc := clock.NewFake(time.Unix(1e9, 0))
	st := memstore.New(memstore.Config{Clock: fc, TTLs: store.TTLs{Relays: 30 * time.Second}})
	reg := NewRegistry(st, fc)
	ctx := context.Background()
	a, b := newID(t), newID(t)
	for _, id := range []identity.NodeID{a, b} {
		if err := reg.Register(ctx, Info{NodeID: id, Endpoints: []Endpoint{{UDP, "192.0.2.1:3478"}}, Capacity: 100, Load: 5}); err != nil {
			t.Fatal(err)
		}
	}
	if err := reg.Register(ctx, Info{NodeID: a}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Register invalid = %v", err)
	}
	// A bad record in the shared store does not hide the good ones.
	if err := st.Put(ctx, store.Relays, "junk", []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	list, err := reg.ListRelays(ctx)
	if err != nil || len(list) != 2 {
		t.Fatalf("ListRelays = %v, %v", list, err)
	}
	if list[0].Updated.IsZero() || list[0].Capacity != 100 || list[0].Load != 5 {
		t.Fatalf("record lost fields: %+v", list[0])
	}
	// a heartbeats, b goes silent.
	fc.Advance(20 * time.Second)
	if err := reg.Register(ctx, Info{NodeID: a, Endpoints: []Endpoint{{UDP, "192.0.2.1:3478"}}, Capacity: 100, Load: 6}); err != nil {
		t.Fatal(err)
	}
	fc.Advance(15 * time.Second)
	list, _ = reg.ListRelays(ctx)
	if len(list) != 1 || list[0].NodeID != a || list[0].Load != 6 {
		t.Fatalf("after b stopped heartbeating ListRelays = %+v, want only a with load 6", list)
	}
	if err := reg.Unregister(ctx, a); err != nil {
		t.Fatal(err)
	}
	if list, _ = reg.ListRelays(ctx); len(list) != 0 {
		t.Fatalf("after Unregister ListRelays = %+v", list)
	}
}

func TestBeacon(t *testing.T) {
	st := memstore.New(memstore.Config{TTLs: store.TTLs{Relays: 300 * time.Millisecond}})
	reg := NewRegistry(st, nil)
	id := newID(t)
	var mu sync.Mutex
	load := 0
	b := StartBeacon(reg, func() Info {
		mu.Lock()
		defer mu.Unlock()
		load++
		return Info{NodeID: id, Endpoints: []Endpoint{{UDP, "192.0.2.1:3478"}}, Capacity: 100, Load: load}
	}, 50*time.Millisecond, nil)
	ctx := context.Background()
	time.Sleep(500 * time.Millisecond) // longer than the TTL: only heartbeats keep it
	list, _ := reg.ListRelays(ctx)
	if len(list) != 1 || list[0].Load < 3 {
		t.Fatalf("with beacon running ListRelays = %+v, want the relay with fresh load", list)
	}
	b.Close()
	b.Close()
	time.Sleep(400 * time.Millisecond)
	if list, _ := reg.ListRelays(ctx); len(list) != 0 {
		t.Fatalf("relay still listed after its beacon stopped: %+v", list)
	}
}

// stunResponder returns the address of a real peerlink STUN server seen through a UDP
// forwarder that holds each answer for delay, or drops them all when delay is negative.
func stunResponder(t *testing.T, delay time.Duration) string {
	t.Helper()
	target := net.UDPAddrFromAddrPort(stuntest.Start(t, stuntest.Options{}).UDPAddr(0))
	front, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	back, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		clients = map[string]net.Addr{} // transaction ID → prober
		wg      sync.WaitGroup
	)
	wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := front.ReadFrom(buf)
			if err != nil {
				return
			}
			if n >= 20 {
				mu.Lock()
				clients[string(buf[8:20])] = from
				mu.Unlock()
				back.WriteTo(buf[:n], target)
			}
		}
	})
	wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			n, _, err := back.ReadFrom(buf)
			if err != nil {
				return
			}
			if n < 20 || delay < 0 {
				continue
			}
			mu.Lock()
			to := clients[string(buf[8:20])]
			mu.Unlock()
			resp := append([]byte(nil), buf[:n]...)
			time.Sleep(delay) // one prober per forwarder, so holding the loop is fine
			front.WriteTo(resp, to)
		}
	})
	t.Cleanup(func() { front.Close(); back.Close(); wg.Wait() })
	return front.LocalAddr().String()
}

func TestSTUNProber(t *testing.T) {
	addr := stunResponder(t, 40*time.Millisecond)
	rtt, err := STUNProber{}.Probe(context.Background(), Endpoint{UDP, addr})
	if err != nil {
		t.Fatal(err)
	}
	if rtt < 40*time.Millisecond || rtt > 500*time.Millisecond {
		t.Fatalf("rtt %v, want about 40ms", rtt)
	}
	silent := stunResponder(t, -1)
	start := time.Now()
	_, err = STUNProber{Timeout: 300 * time.Millisecond, Retransmit: 50 * time.Millisecond}.Probe(context.Background(), Endpoint{UDP, silent})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Second {
		t.Fatalf("silent endpoint: %v after %v, want a deadline error after 300ms", err, time.Since(start))
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := (STUNProber{}).Probe(context.Background(), Endpoint{TCP, l.Addr().String()}); err != nil {
		t.Fatalf("tcp probe: %v", err)
	}
}

// TestSTUNProberCoturn probes a real TURN server, so the probe is checked against an
// implementation that is not peerlink's.
func TestSTUNProberCoturn(t *testing.T) {
	bin, err := exec.LookPath("turnserver")
	if err != nil {
		t.Skip("turnserver (coturn) not installed; make deps installs it")
	}
	port := freeUDPPort(t)
	cmd := exec.Command(bin, "-n", "--listening-ip=127.0.0.1", fmt.Sprintf("--listening-port=%d", port),
		"--no-tls", "--no-dtls", "--no-cli", "--stun-only", "--log-file=stdout", "--simple-log",
		"--pidfile="+t.TempDir()+"/turn.pid")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	p := STUNProber{Timeout: 300 * time.Millisecond, Retransmit: 50 * time.Millisecond}
	deadline := time.Now().Add(30 * time.Second) // coturn can take seconds to start on a busy machine
	for {
		rtt, err := p.Probe(context.Background(), Endpoint{UDP, addr})
		if err == nil {
			t.Logf("coturn answered in %v", rtt)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("coturn never answered the probe: %v", err)
		}
	}
}

func freeUDPPort(t *testing.T) int {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

type listSource []Info

func (s listSource) ListRelays(context.Context) ([]Info, error) { return s, nil }

func TestFindRelay(t *testing.T) {
	near, mid, far := stunResponder(t, 0), stunResponder(t, 30*time.Millisecond), stunResponder(t, 80*time.Millisecond)
	dead := stunResponder(t, -1)
	tcpl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpl.Close()
	ids := make([]identity.NodeID, 6)
	for i := range ids {
		ids[i] = newID(t)
	}
	udp := func(a string) []Endpoint { return []Endpoint{{UDP, a}} }
	target := ids[5]
	tests := []struct {
		name    string
		relays  []Info
		finder  Finder
		want    identity.NodeID
		wantErr error
	}{
		{
			name: "lowest latency when loads equal",
			relays: []Info{
				{NodeID: ids[0], Endpoints: udp(far), Capacity: 10, Load: 1},
				{NodeID: ids[1], Endpoints: udp(near), Capacity: 10, Load: 1},
				{NodeID: ids[2], Endpoints: udp(mid), Capacity: 10, Load: 1},
			},
			want: ids[1],
		},
		{
			name: "load outweighs a small latency gain",
			relays: []Info{
				{NodeID: ids[1], Endpoints: udp(near), Capacity: 10, Load: 9}, // ~0 ms + 45 ms
				{NodeID: ids[2], Endpoints: udp(mid), Capacity: 10, Load: 0},  // ~30 ms + 0
			},
			want: ids[2],
		},
		{
			name: "full relay skipped",
			relays: []Info{
				{NodeID: ids[1], Endpoints: udp(near), Capacity: 10, Load: 10},
				{NodeID: ids[0], Endpoints: udp(far), Capacity: 10, Load: 0},
			},
			want: ids[0],
		},
		{
			name: "unreachable relay skipped",
			relays: []Info{
				{NodeID: ids[3], Endpoints: udp(dead), Capacity: 10},
				{NodeID: ids[0], Endpoints: udp(far), Capacity: 10, Load: 2},
			},
			finder: Finder{ProbeTimeout: 300 * time.Millisecond},
			want:   ids[0],
		},
		{
			name: "target is not its own relay",
			relays: []Info{
				{NodeID: target, Endpoints: udp(near), Capacity: 10},
				{NodeID: ids[2], Endpoints: udp(mid), Capacity: 10},
			},
			want: ids[2],
		},
		{
			name: "transport filter",
			relays: []Info{
				{NodeID: ids[1], Endpoints: udp(near), Capacity: 10},
				{NodeID: ids[4], Endpoints: []Endpoint{{UDP, far}, {TCP, tcpl.Addr().String()}}, Capacity: 10},
			},
			finder: Finder{Transports: []Transport{TCP, TLS}},
			want:   ids[4],
		},
		{name: "no relays", wantErr: ErrNoRelay},
		{
			name:    "none answers",
			relays:  []Info{{NodeID: ids[3], Endpoints: udp(dead)}},
			finder:  Finder{ProbeTimeout: 200 * time.Millisecond},
			wantErr: ErrNoRelay,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.finder
			f.Source = listSource(tt.relays)
			got, err := f.FindRelay(context.Background(), target)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("FindRelay = %+v, %v; want %v", got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.NodeID != tt.want {
				t.Fatalf("FindRelay picked %s (latency %v, load %.2f), want %s", got.NodeID.Short(), got.Latency, got.Load, tt.want.Short())
			}
			if f.Transports != nil && got.Endpoint.Transport != f.Transports[0] {
				t.Fatalf("endpoint %v, want transport %s", got.Endpoint, f.Transports[0])
			}
		})
	}
}

func TestChoiceJSON(t *testing.T) {
	id := newID(t)
	c := Choice{NodeID: id, Endpoint: Endpoint{UDP, "192.0.2.1:3478"}, Latency: 25 * time.Millisecond, LatencyMS: 25, Load: 0.3}
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"node_id":"` + id.String() + `","endpoint":{"transport":"udp","addr":"192.0.2.1:3478"},"latency_ms":25,"load":0.3}`
	if string(b) != want {
		t.Fatalf("JSON\n got %s\nwant %s", b, want)
	}
}
