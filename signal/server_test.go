package signal_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/identity"
	"peerlink/nat"
	"peerlink/relayreg"
	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/store/memstore"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func testProfile() nat.Profile {
	return nat.Profile{
		Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPC, PortDelta: 1,
		PublicIP: netip.MustParseAddr("203.0.113.7"), PublicPort: 40001, Hairpinning: true,
		BindingLifetime: nat.Duration(30 * time.Second),
		DetectedAt:      time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC), Confidence: nat.ConfidenceHigh,
	}
}

func testInfo() signal.ConnectionInfo {
	host := signal.Candidate{Type: signal.CandidateHost, IP: netip.MustParseAddr("192.168.1.10"), Port: 51820, Priority: signal.CandidatePriority(signal.CandidateHost, 65535)}
	srflx := signal.Candidate{Type: signal.CandidateSrflx, IP: netip.MustParseAddr("203.0.113.7"), Port: 40001, Priority: signal.CandidatePriority(signal.CandidateSrflx, 65535)}
	return signal.NewConnectionInfo(testProfile(), netip.MustParseAddrPort("192.168.1.10:51820"), []signal.Candidate{host, srflx})
}

func recv(t *testing.T, c *signal.Client) *signal.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := c.Recv(ctx)
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	return m
}

// TestSignaling runs a whole exchange between two peers: publish, lookup, offer, answer,
// candidate, punch and bye, over a real WebSocket server.
func TestSignaling(t *testing.T) {
	for _, withTLS := range []bool{false, true} {
		name := "ws"
		if withTLS {
			name = "wss"
		}
		t.Run(name, func(t *testing.T) {
			srv := signaltest.Start(t, signal.Config{}, withTLS)
			a, b := srv.Dial(t, nil), srv.Dial(t, nil)
			ctx := ctxT(t)
			info := testInfo()
			if err := a.Publish(ctx, info); err != nil {
				t.Fatalf("Publish: %v", err)
			}
			p, err := b.Lookup(ctx, a.NodeID())
			if err != nil {
				t.Fatalf("Lookup: %v", err)
			}
			if !p.Online || p.LastSeen.IsZero() || p.Info == nil || p.Published.IsZero() {
				t.Fatalf("Lookup = %+v, want online with info", p)
			}
			if !reflect.DeepEqual(*p.Info, info) {
				t.Fatalf("looked-up info differs:\n got %+v\nwant %+v", *p.Info, info)
			}
			prof, err := b.FetchProfile(ctx, a.NodeID())
			if err != nil || !reflect.DeepEqual(prof, testProfile()) {
				t.Fatalf("FetchProfile = %+v, %v", prof, err)
			}

			if err := a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: b.NodeID(), Session: "s-1", Info: &info}); err != nil {
				t.Fatalf("Send offer: %v", err)
			}
			m := recv(t, b)
			if m.Type != signal.TypeOffer || m.From != a.NodeID() || m.To != b.NodeID() || m.Session != "s-1" {
				t.Fatalf("got %s from %s session %q", m.Type, m.From.Short(), m.Session)
			}
			if m.Info.NATType != nat.ClassicPortRestrictedCone || !reflect.DeepEqual(*m.Info, info) {
				t.Fatalf("offer info = %+v", m.Info)
			}
			if d := time.Since(m.Time); d < 0 || d > 5*time.Second {
				t.Fatalf("offer timestamp %v is %v old", m.Time, d)
			}

			answer := info
			answer.NATType = nat.ClassicFullCone
			if err := b.Send(ctx, &signal.Message{Type: signal.TypeAnswer, To: a.NodeID(), Session: "s-1", Info: &answer}); err != nil {
				t.Fatalf("Send answer: %v", err)
			}
			if m := recv(t, a); m.Type != signal.TypeAnswer || m.Info.NATType != nat.ClassicFullCone {
				t.Fatalf("answer = %s %+v", m.Type, m.Info)
			}
			cand := signal.Candidate{Type: signal.CandidateRelayed, IP: netip.MustParseAddr("198.51.100.1"), Port: 3478, Priority: 5, Transport: "udp"}
			if err := b.Send(ctx, &signal.Message{Type: signal.TypeCandidate, To: a.NodeID(), Session: "s-1", Candidate: &cand}); err != nil {
				t.Fatal(err)
			}
			if m := recv(t, a); m.Type != signal.TypeCandidate || *m.Candidate != cand {
				t.Fatalf("candidate = %s %+v", m.Type, m.Candidate)
			}
			punch := signal.Punch{
				Technique: nat.PredictContiguity, StartAt: time.Now().Add(2 * time.Second).Truncate(time.Millisecond),
				Addresses: []netip.AddrPort{netip.MustParseAddrPort("203.0.113.7:40002")}, PortDelta: 1, Interval: 20 * time.Millisecond, Attempt: 1,
			}
			if err := a.Send(ctx, &signal.Message{Type: signal.TypePunch, To: b.NodeID(), Session: "s-1", Punch: &punch}); err != nil {
				t.Fatal(err)
			}
			if m := recv(t, b); m.Type != signal.TypePunch || !reflect.DeepEqual(*m.Punch, punch) {
				t.Fatalf("punch = %+v, want %+v", m.Punch, punch)
			}
			if err := a.Send(ctx, &signal.Message{Type: signal.TypeBye, To: b.NodeID(), Session: "s-1", Bye: &signal.Bye{Reason: "done"}}); err != nil {
				t.Fatal(err)
			}
			if m := recv(t, b); m.Type != signal.TypeBye || m.Bye.Reason != "done" {
				t.Fatalf("bye = %+v", m.Bye)
			}
			if st := srv.Stats(); st.Routed != 5 || st.Authenticated != 2 || st.Errors != 0 {
				t.Fatalf("server stats %+v", st)
			}
			if st := a.Stats(); st.Rejected != 0 || st.Received != 2 {
				t.Fatalf("client stats %+v", st)
			}
		})
	}
}

func TestOfflineAndPresence(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	a, b := srv.Dial(t, nil), srv.Dial(t, nil)
	ctx := ctxT(t)
	stranger, _ := identity.Generate()
	info := testInfo()

	start := time.Now()
	err := a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: stranger.NodeID(), Session: "x", Info: &info})
	if !errors.Is(err, signal.ErrPeerOffline) {
		t.Fatalf("Send to unknown node = %v, want ErrPeerOffline", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("ErrPeerOffline took %v", d)
	}
	if _, err := a.Lookup(ctx, stranger.NodeID()); !errors.Is(err, signal.ErrNotFound) {
		t.Fatalf("Lookup of unknown node = %v, want ErrNotFound", err)
	}
	if _, err := a.FetchProfile(ctx, b.NodeID()); !errors.Is(err, signal.ErrNotFound) {
		t.Fatalf("FetchProfile of node that never published = %v, want ErrNotFound", err)
	}

	bID := b.NodeID()
	before := time.Now()
	b.Close()
	var p *signal.Peer
	for {
		p, err = a.Lookup(ctx, bID)
		if err != nil {
			t.Fatal(err)
		}
		if !p.Online {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if p.LastSeen.Before(before.Add(-time.Millisecond)) {
		t.Fatalf("last seen %v, before the disconnect at %v", p.LastSeen, before)
	}
	err = a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: bID, Session: "x", Info: &info})
	if !errors.Is(err, signal.ErrPeerOffline) {
		t.Fatalf("Send to disconnected node = %v, want ErrPeerOffline", err)
	}
}

func TestReplacedConnection(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	id, _ := identity.Generate()
	first := srv.DialAs(t, id, nil)
	second := srv.DialAs(t, id, nil)
	select {
	case <-first.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("first connection not closed when the node connected again")
	}
	if !errors.Is(first.Err(), signal.ErrReplaced) {
		t.Fatalf("first connection ended with %v, want ErrReplaced", first.Err())
	}
	other := srv.Dial(t, nil)
	info := testInfo()
	if err := other.Send(ctxT(t), &signal.Message{Type: signal.TypeOffer, To: id.NodeID(), Session: "r", Info: &info}); err != nil {
		t.Fatal(err)
	}
	if m := recv(t, second); m.From != other.NodeID() {
		t.Fatal("message did not reach the replacing connection")
	}
}

func TestServerClose(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	c := srv.Dial(t, nil)
	srv.Close()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client not disconnected by server Close")
	}
	if !errors.Is(c.Err(), signal.ErrShuttingDown) {
		t.Fatalf("client ended with %v, want ErrShuttingDown", c.Err())
	}
	if _, err := c.Lookup(ctxT(t), c.NodeID()); err == nil {
		t.Fatal("request on a closed client succeeded")
	}
}

func TestTURNCredentials(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{TURNSecret: "s3cret", TURNTTL: 10 * time.Minute, TURNURIs: []string{"turn:127.0.0.1:3478"}}, false)
	c := srv.Dial(t, nil)
	cred, err := c.TURNCredentials(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	exp, node, ok := strings.Cut(cred.Username, ":")
	if !ok || node != c.NodeID().String() || exp == "" {
		t.Fatalf("username %q, want expiry:%s", cred.Username, c.NodeID())
	}
	if d := time.Until(cred.Expiry()); d < 9*time.Minute || d > 11*time.Minute {
		t.Fatalf("expiry in %v, want about 10m", d)
	}
	if cred.Password != signal.TURNPassword("s3cret", cred.Username) || cred.TTL != 10*time.Minute || len(cred.URIs) != 1 {
		t.Fatalf("credentials %+v", cred)
	}

	none := signaltest.Start(t, signal.Config{}, false)
	if _, err := none.Dial(t, nil).TURNCredentials(ctxT(t)); !errors.Is(err, signal.ErrTURNUnavailable) {
		t.Fatalf("without a secret: %v, want ErrTURNUnavailable", err)
	}
}

func TestRelayRegistryOverSignal(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	relay, user := srv.Dial(t, nil), srv.Dial(t, nil)
	ctx := ctxT(t)
	bad := relayreg.Info{Endpoints: []relayreg.Endpoint{{Transport: "carrier-pigeon", Addr: "x:1"}}}
	if err := relay.RegisterRelay(ctx, bad); !errors.Is(err, signal.ErrInvalid) {
		t.Fatalf("RegisterRelay invalid = %v, want ErrInvalid", err)
	}
	beacon := relayreg.StartBeacon(relay, func() relayreg.Info {
		return relayreg.Info{Endpoints: []relayreg.Endpoint{{Transport: relayreg.UDP, Addr: "192.0.2.9:3478"}}, Capacity: 100, Load: 7}
	}, time.Second, nil)
	defer beacon.Close()
	var list []relayreg.Info
	for len(list) == 0 && ctx.Err() == nil {
		var err error
		if list, err = user.ListRelays(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if len(list) != 1 || list[0].NodeID != relay.NodeID() || list[0].Load != 7 {
		t.Fatalf("ListRelays = %+v, want the relay under its connection's node ID", list)
	}
}

// TestTwoServersOneStore: servers sharing a store route between each other.
func TestTwoServersOneStore(t *testing.T) {
	st := memstore.New(memstore.Config{})
	s1 := signaltest.Start(t, signal.Config{Store: st}, false)
	s2 := signaltest.Start(t, signal.Config{Store: st}, false)
	a, b := s1.Dial(t, nil), s2.Dial(t, nil)
	exchange(t, a, b)
}

// exchange checks that a and b can signal each other in both directions and look each
// other up.
func exchange(t *testing.T, a, b *signal.Client) {
	t.Helper()
	ctx := ctxT(t)
	info := testInfo()
	session := signal.NewNonce()
	if err := a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: b.NodeID(), Session: session, Info: &info}); err != nil {
		t.Fatalf("offer: %v", err)
	}
	if m := recv(t, b); m.Type != signal.TypeOffer || m.Session != session || m.From != a.NodeID() {
		t.Fatalf("b got %s session %s", m.Type, m.Session)
	}
	if err := b.Send(ctx, &signal.Message{Type: signal.TypeAnswer, To: a.NodeID(), Session: session, Info: &info}); err != nil {
		t.Fatalf("answer: %v", err)
	}
	if m := recv(t, a); m.Type != signal.TypeAnswer || m.Session != session {
		t.Fatalf("a got %s session %s", m.Type, m.Session)
	}
	p, err := a.Lookup(ctx, b.NodeID())
	if err != nil || !p.Online {
		t.Fatalf("Lookup across servers = %+v, %v", p, err)
	}
}

func TestListenAndServe(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	srv, err := signal.NewServer(signal.Config{Listen: addr})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx) }()
	id, _ := identity.Generate()
	var c *signal.Client
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		if c, err = signal.Dial(ctxT(t), "http://"+addr+"/any/path", id, nil); err == nil || time.Since(start) > 5*time.Second {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("ListenAndServe = %v after cancel", err)
	}
	if _, err := signal.Dial(ctxT(t), "ws://"+addr+"/", id, nil); err == nil {
		t.Fatal("dial succeeded after ListenAndServe returned")
	}
}

// TestAuthHost: behind a proxy the server checks the name clients dialled, not the
// address it listens on.
func TestAuthHost(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{AuthHost: "rdv.example:443"}, false)
	id, _ := identity.Generate()
	if _, err := signal.Dial(ctxT(t), srv.URL, id, nil); !errors.Is(err, signal.ErrAuthFailed) {
		t.Fatalf("dial signing the listener's address = %v, want ErrAuthFailed", err)
	}
	r := dialRaw(t, srv)
	r.id, _ = identity.Generate()
	r.send(r.authFrame(r.id, "RDV.example:443"))
	if f := r.read(); f.Type != signal.TypeWelcome {
		t.Fatalf("auth for the configured host answered %s %s", f.Type, f.Body)
	}
}
