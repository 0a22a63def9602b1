package relay_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pion/stun/v3"
	"github.com/prometheus/client_golang/prometheus"

	"peerlink/clock"
	"peerlink/relay"
	"peerlink/relay/relaytest"
)

// otherSource is a second source address on loopback: Linux answers for all of
// 127.0.0.0/8, so a socket bound here is another client machine to the relay.
const otherSource = "127.0.0.2"

// dialFrom is dialTURN over UDP from a chosen local address.
func dialFrom(t testing.TB, local string, server netip.AddrPort, user, pass string) *turnClient {
	t.Helper()
	laddr := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(local), 0))
	c, err := net.DialUDP("udp", laddr, net.UDPAddrFromAddrPort(server))
	if err != nil {
		t.Fatal(err)
	}
	return newTURNClient(t, c, false, user, pass)
}

// logCounter counts the log records whose message contains a word.
type logCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func (l *logCounter) Enabled(context.Context, slog.Level) bool { return true }
func (l *logCounter) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logCounter) WithGroup(string) slog.Handler            { return l }
func (l *logCounter) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, w := range []string{"request rate", "allocation quota"} {
		if strings.Contains(r.Message, w) {
			l.n[w]++
		}
	}
	return nil
}

func (l *logCounter) count(word string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[word]
}

// burst sends n copies of a request (fresh transaction IDs) back to back on conn and
// counts the responses that come within the wait.
func burst(t *testing.T, conn net.Conn, stream bool, n int, build func() []byte) int {
	t.Helper()
	for range n {
		b := build()
		if _, err := conn.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	got := 0
	buf := make([]byte, 2048)
	for {
		conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if stream {
			if _, err := readFrame(conn, buf); err != nil {
				return got
			}
		} else if _, err := conn.Read(buf); err != nil {
			return got
		}
		got++
	}
}

// TestRequestLimit sends a burst of requests from one source to a relay on a fake clock
// (no tokens are earned unless the test advances it) and checks that exactly what the
// bucket holds is answered, that the rest is counted by reason and logged once, that
// another source is untouched, and that time refills the bucket.
func TestRequestLimit(t *testing.T) {
	const sent = 30
	tests := []struct {
		name      string
		network   string
		method    stun.Method
		limit     relay.RequestLimit
		answered  int // of sent, from the burst
		drop      relay.DropReason
		metric    string
		refilled  int // answered of sent after the clock moves 2000 s (2 tokens)
		logsFirst int
	}{
		{"unauthenticated Allocate", "udp", stun.MethodAllocate, relay.RequestLimit{Rate: 0.001, Burst: 20},
			10, relay.DropRateLimitedUnauth, "rate_limited_unauthenticated", 1, 1},
		{"unauthenticated Allocate, cost 5", "udp", stun.MethodAllocate, relay.RequestLimit{Rate: 0.001, Burst: 20, UnauthenticatedCost: 5},
			4, relay.DropRateLimitedUnauth, "rate_limited_unauthenticated", 0, 1},
		{"Binding costs one token", "udp", stun.MethodBinding, relay.RequestLimit{Rate: 0.001, Burst: 20},
			20, relay.DropRateLimited, "rate_limited", 2, 1},
		{"over TCP", "tcp", stun.MethodBinding, relay.RequestLimit{Rate: 0.001, Burst: 20},
			20, relay.DropRateLimited, "rate_limited", 2, 1},
		{"disabled", "udp", stun.MethodAllocate, relay.RequestLimit{Disabled: true, Rate: 0.001, Burst: 20},
			sent, relay.DropRateLimitedUnauth, "rate_limited_unauthenticated", sent, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := clock.NewFake(time.Unix(1_800_000_000, 0))
			logs := &logCounter{n: map[string]int{}}
			reg := prometheus.NewRegistry()
			r := relaytest.Start(t, relay.Config{Clock: clk, RequestLimit: tt.limit, Logger: slog.New(logs), Metrics: reg})
			server := r.UDP
			if tt.network == "tcp" {
				server = r.TCP
			}
			conn, err := net.Dial(tt.network, server.String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			var attrs []stun.Setter
			if tt.method == stun.MethodAllocate {
				attrs = append(attrs, udpTransport)
			}
			build := func() []byte { return (&turnClient{t: t}).build(tt.method, false, attrs...).Raw }

			if got := burst(t, conn, tt.network == "tcp", sent, build); got != tt.answered {
				t.Errorf("%d of %d answered, want %d", got, sent, tt.answered)
			}
			if got, want := r.Stats().Dropped(tt.drop), uint64(sent-tt.answered); got != want {
				t.Errorf("%v drops %d, want %d", tt.drop, got, want)
			}
			if got := gather(t, reg)[`peerlink_relay_dropped_packets_total{reason="`+tt.metric+`"}`]; got != float64(sent-tt.answered) {
				t.Errorf("metric %s: %v, want %d", tt.metric, got, sent-tt.answered)
			}
			if got := logs.count("request rate"); got != tt.logsFirst {
				t.Errorf("%d log lines about the source, want %d", got, tt.logsFirst)
			}

			// Another source has a bucket of its own.
			other := dialFrom(t, otherSource, r.UDP, relaytest.User, relaytest.Password)
			if resp, err := other.roundTrip(other.build(stun.MethodBinding, false)); err != nil || resp.Type.Class != stun.ClassSuccessResponse {
				t.Errorf("another source was not answered: %v", err)
			}

			// 2000 s at 0.001 tokens a second: two tokens, and one more log line.
			clk.Advance(2000 * time.Second)
			if got := burst(t, conn, tt.network == "tcp", sent, build); got != tt.refilled {
				t.Errorf("after refill: %d of %d answered, want %d", got, sent, tt.refilled)
			}
			if got := logs.count("request rate"); got != 2*tt.logsFirst {
				t.Errorf("after refill: %d log lines about the source, want %d", got, 2*tt.logsFirst)
			}
		})
	}
}

// TestRequestLimitAuthenticated checks that a client with credentials goes on being
// served after an anonymous flood from another source has emptied that source's bucket,
// and that its own authenticated requests cost one token each.
func TestRequestLimitAuthenticated(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_800_000_000, 0))
	r := relaytest.Start(t, relay.Config{Clock: clk, RequestLimit: relay.RequestLimit{Rate: 0.001, Burst: 10}})
	flood, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(otherSource+":0")), net.UDPAddrFromAddrPort(r.UDP))
	if err != nil {
		t.Fatal(err)
	}
	defer flood.Close()
	raw := (&turnClient{t: t}).build(stun.MethodAllocate, false, udpTransport).Raw
	burst(t, flood, false, 100, func() []byte { return raw })

	// 401 (2 tokens), Allocate, then 7 permissions at one token each: 10 in all.
	c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	c.allocate()
	for i := range 7 {
		if code := c.permit(netip.MustParseAddrPort("127.0.0.1:9")); code != 0 {
			t.Fatalf("permission %d: %d", i, code)
		}
	}
	m := c.build(stun.MethodCreatePermission, true, peerAttr(netip.MustParseAddrPort("127.0.0.1:9")))
	ch := c.await(m.TransactionID)
	c.send(m.Raw)
	select {
	case <-ch:
		t.Fatal("a request past the bucket was answered")
	case <-time.After(300 * time.Millisecond):
	}
	if got := r.Stats().Dropped(relay.DropRateLimited); got != 1 {
		t.Errorf("authenticated drops %d, want 1", got)
	}
}

// TestPerSourceQuota checks the cap on one source's allocations, whatever users it
// authenticates as, next to the per-user quota; and that other sources are not
// affected.
func TestPerSourceQuota(t *testing.T) {
	users := map[string]string{"a": "1", "b": "2"}
	tests := []struct {
		name  string
		cfg   relay.Config
		quota int // allocations one source gets; then 486
	}{
		{"quota 3, two users", relay.Config{PerSourceQuota: 3}, 3},
		// The default quota, filled at once: the default request burst has room for it.
		{"default", relay.Config{}, relay.DefaultPerSourceQuota},
		{"no cap", relay.Config{PerSourceQuota: -1, RequestLimit: relay.RequestLimit{Disabled: true}}, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.Users = users
			reg := prometheus.NewRegistry()
			cfg.Metrics = reg
			r := relaytest.Start(t, cfg)
			n := tt.quota
			if n < 0 {
				n = relay.DefaultPerSourceQuota + 6
			}
			var clients []*turnClient
			for i := range n {
				user := []string{"a", "b"}[i%2]
				c := dialTURN(t, "udp", r.UDP, user, users[user])
				if code := errCode(c.request(stun.MethodAllocate, udpTransport)); code != 0 {
					t.Fatalf("allocation %d from one source: %d", i+1, code)
				}
				clients = append(clients, c)
			}
			if tt.quota < 0 {
				if st := r.Stats(); st.Refused != 0 {
					t.Fatalf("refused %d with no cap", st.Refused)
				}
				return
			}
			extra := dialTURN(t, "udp", r.UDP, "b", "2")
			if code := errCode(extra.request(stun.MethodAllocate, udpTransport)); code != 486 {
				t.Fatalf("allocation %d from one source: %d, want 486", tt.quota+1, code)
			}
			if other := dialFrom(t, otherSource, r.UDP, "a", "1"); errCode(other.request(stun.MethodAllocate, udpTransport)) != 0 {
				t.Fatal("another source was refused")
			}
			// One ends: the source may allocate again.
			clients[0].request(stun.MethodRefresh, lifetimeAttr(0))
			waitFor(t, func() bool { return r.Stats().Sessions == tt.quota })
			if code := errCode(extra.request(stun.MethodAllocate, udpTransport)); code != 0 {
				t.Fatalf("after one ended: %d, want success", code)
			}
			st := r.Stats()
			if st.Refused != 1 || st.RefusedBy[relay.RefuseSourceQuota] != 1 {
				t.Errorf("refused %d, by source quota %d; want 1 and 1", st.Refused, st.RefusedBy[relay.RefuseSourceQuota])
			}
			if got := gather(t, reg)[`peerlink_relay_allocations_refused_by_reason_total{reason="source_quota"}`]; got != 1 {
				t.Errorf("source_quota metric %v, want 1", got)
			}
		})
	}
}

// TestLimitConfig checks the new limits' Config validation.
func TestLimitConfig(t *testing.T) {
	tests := []struct {
		name string
		rl   relay.RequestLimit
		ok   bool
	}{
		{"zero: defaults", relay.RequestLimit{}, true},
		{"negative rate", relay.RequestLimit{Rate: -1}, false},
		{"burst under the unauthenticated cost", relay.RequestLimit{Burst: 1, UnauthenticatedCost: 2}, false},
		{"disabled ignores the rest", relay.RequestLimit{Disabled: true, Rate: -1}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := relay.New(relay.Config{ListenUDP: "127.0.0.1:0", Secret: "s", RequestLimit: tt.rl, PerSourceQuota: -1})
			var ce *relay.ConfigError
			if tt.ok != (err == nil) || err != nil && (!errors.As(err, &ce) || ce.Field != "RequestLimit") {
				t.Fatalf("New: %v, want ok %v", err, tt.ok)
			}
		})
	}
}
