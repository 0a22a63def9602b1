package relay_test

import (
	"bytes"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pion/stun/v3"
	"go.uber.org/goleak"

	"peerlink/clock"
	"peerlink/relay"
	"peerlink/relay/relaytest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const waitData = 2 * time.Second

// relayPair is a raw client with an allocation on a test relay and a peer.
func relayPair(t *testing.T, cfg relay.Config) (*relaytest.Relay, *turnClient, netip.AddrPort, *peer) {
	t.Helper()
	r := relaytest.Start(t, cfg)
	c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	relayed := c.allocate()
	return r, c, relayed, newPeer(t, "udp4", "127.0.0.1:0")
}

func TestRelaysBothWays(t *testing.T) {
	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			r := relaytest.Start(t, relay.Config{})
			server := r.UDP
			if network == "tcp" {
				server = r.TCP
			}
			c := dialTURN(t, network, server, relaytest.User, relaytest.Password)
			relayed := c.allocate()
			if relayed.Addr() != netip.MustParseAddr("127.0.0.1") {
				t.Fatalf("relayed address %v, want one on 127.0.0.1", relayed)
			}
			p := newPeer(t, "udp4", "127.0.0.1:0")

			// Send indication out, Data indication back.
			if code := c.permit(p.addr); code != 0 {
				t.Fatalf("CreatePermission: %d", code)
			}
			c.sendIndication(p.addr, []byte("hello peer"))
			got, from, ok := p.recv(waitData)
			if !ok || string(got) != "hello peer" || from != relayed {
				t.Fatalf("peer got %q from %v (ok %v), want %q from %v", got, from, ok, "hello peer", relayed)
			}
			p.sendTo(relayed, []byte("hello client"))
			b, ok := c.next(waitData)
			if !ok {
				t.Fatal("no Data indication")
			}
			ch, src, payload := decodeData(t, b)
			if ch != 0 || src != p.addr || string(payload) != "hello client" {
				t.Fatalf("got channel %#x from %v %q, want a Data indication from %v", ch, src, payload, p.addr)
			}

			// Channel both ways, with a payload length that needs padding.
			if code := c.bind(0x4001, p.addr); code != 0 {
				t.Fatalf("ChannelBind: %d", code)
			}
			c.sendChannel(0x4001, []byte("over the channel"))
			if got, from, ok := p.recv(waitData); !ok || string(got) != "over the channel" || from != relayed {
				t.Fatalf("peer got %q from %v", got, from)
			}
			p.sendTo(relayed, []byte("back, odd"))
			b, ok = c.next(waitData)
			if !ok {
				t.Fatal("no ChannelData")
			}
			if ch, _, payload := decodeData(t, b); ch != 0x4001 || string(payload) != "back, odd" {
				t.Fatalf("got channel %#x %q", ch, payload)
			}
			waitFor(t, func() bool {
				st := r.Stats()
				return st.PacketsToPeers == 2 && st.PacketsToClients == 2 && st.Sessions == 1 &&
					st.BytesToPeers == uint64(len("hello peer")+len("over the channel")) &&
					st.BytesToClients == uint64(len("hello client")+len("back, odd"))
			})
		})
	}
}

// TestRelayToRelay: two clients relayed by the same relay, each the other's peer. The
// relay hands their datagrams across without the kernel, and must check and account
// exactly as if they had gone through it.
func TestRelayToRelay(t *testing.T) {
	r := relaytest.Start(t, relay.Config{})
	a := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	relayedA := a.allocate()
	b := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	relayedB := b.allocate()
	if code := a.bind(0x4000, relayedB); code != 0 {
		t.Fatal(code)
	}
	// B has no permission for A yet: nothing gets through.
	a.sendChannel(0x4000, []byte("not yet"))
	if _, ok := b.next(300 * time.Millisecond); ok {
		t.Fatal("relayed to an allocation without a permission for the sender")
	}
	waitFor(t, func() bool { return r.Stats().Dropped(relay.DropNoPermission) == 1 })
	if code := b.permit(relayedA); code != 0 {
		t.Fatal(code)
	}
	a.sendChannel(0x4000, []byte("data indication"))
	msg, ok := b.next(waitData)
	if !ok {
		t.Fatal("nothing relayed")
	}
	if ch, from, payload := decodeData(t, msg); ch != 0 || from != relayedA || string(payload) != "data indication" {
		t.Fatalf("B got channel %#x from %v: %q", ch, from, payload)
	}
	if code := b.bind(0x4123, relayedA); code != 0 {
		t.Fatal(code)
	}
	a.sendIndication(relayedB, []byte("over B's channel"))
	msg, ok = b.next(waitData)
	if !ok {
		t.Fatal("nothing relayed")
	}
	if ch, _, payload := decodeData(t, msg); ch != 0x4123 || string(payload) != "over B's channel" {
		t.Fatalf("B got channel %#x: %q", ch, payload)
	}
	b.sendChannel(0x4123, []byte("and back"))
	msg, ok = a.next(waitData)
	if !ok {
		t.Fatal("nothing relayed back")
	}
	if ch, _, payload := decodeData(t, msg); ch != 0x4000 || string(payload) != "and back" {
		t.Fatalf("A got channel %#x: %q", ch, payload)
	}
	waitFor(t, func() bool {
		st := r.Stats()
		// Four datagrams left clients; three reached one.
		return st.PacketsToPeers == 4 && st.PacketsToClients == 3
	})
}

// TestLoops runs the relay with several event loops: clients spread over them by
// SO_REUSEPORT, and data between allocations on different loops goes through the
// kernel.
func TestLoops(t *testing.T) {
	r := relaytest.Start(t, relay.Config{Loops: 3})
	const n = 12
	clients := make([]*turnClient, n)
	relayed := make([]netip.AddrPort, n)
	for i := range clients {
		network := "udp"
		if i%4 == 3 {
			network = "tcp"
		}
		server := r.UDP
		if network == "tcp" {
			server = r.TCP
		}
		clients[i] = dialTURN(t, network, server, relaytest.User, relaytest.Password)
		relayed[i] = clients[i].allocate()
	}
	for i, c := range clients {
		if code := c.bind(0x4000, relayed[(i+1)%n]); code != 0 {
			t.Fatal(code)
		}
		if code := c.permit(relayed[(i+n-1)%n]); code != 0 {
			t.Fatal(code)
		}
	}
	for i, c := range clients {
		c.sendChannel(0x4000, []byte(fmt.Sprint("from ", i)))
	}
	for i, c := range clients {
		msg, ok := c.next(waitData)
		if !ok {
			t.Fatalf("client %d got nothing", i)
		}
		if _, from, payload := decodeData(t, msg); from != relayed[(i+n-1)%n] || string(payload) != fmt.Sprint("from ", (i+n-1)%n) {
			t.Fatalf("client %d got %q from %v", i, payload, from)
		}
	}
}

// TestNoLoopIntoRelay: a client may not aim its relayed address at the relay's own
// listening address (it would make the relay talk to itself).
func TestNoLoopIntoRelay(t *testing.T) {
	r, c, _, _ := relayPair(t, relay.Config{})
	if code := c.bind(0x4000, r.UDP); code != 403 {
		t.Fatalf("ChannelBind to the relay's own address: %d, want 403", code)
	}
	if code := c.permit(r.UDP); code != 0 {
		t.Fatal(code) // permissions are per IP, and loopback is allowed here
	}
	binding := c.build(stun.MethodBinding, false)
	c.sendIndication(r.UDP, binding.Raw)
	if msg, ok := c.next(500 * time.Millisecond); ok {
		t.Fatalf("the relay answered itself: %x", msg)
	}
	waitFor(t, func() bool { return r.Stats().Dropped(relay.DropForbidden) == 1 })
}

func TestNoPermissionNoRelay(t *testing.T) {
	r, c, relayed, p := relayPair(t, relay.Config{})
	if code := c.permit(p.addr); code != 0 {
		t.Fatal(code)
	}
	// Every socket here is on 127.0.0.1, and permissions are per IP, so "no
	// permission" needs an allocation without any.
	bare := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	bareRelayed := bare.allocate()
	p.sendTo(bareRelayed, []byte("unsolicited"))
	bare.sendIndication(p.addr, []byte("no permission"))
	bare.sendChannel(0x4000, []byte("unbound"))
	if _, _, ok := p.recv(300 * time.Millisecond); ok {
		t.Fatal("relayed to a peer without a permission")
	}
	if _, ok := bare.next(300 * time.Millisecond); ok {
		t.Fatal("relayed from a peer without a permission")
	}
	waitFor(t, func() bool {
		st := r.Stats()
		return st.Dropped(relay.DropNoPermission) == 2 && st.Dropped(relay.DropNoChannel) == 1
	})
	other := newPeer(t, "udp4", "127.0.0.1:0")
	other.sendTo(relayed, []byte("same IP, other port"))
	if _, ok := c.next(waitData); !ok {
		t.Fatal("another port of a permitted IP must pass")
	}
}

func TestPeerPolicy(t *testing.T) {
	tests := []struct {
		name string
		cfg  relay.Config
		peer string
		want int
	}{
		{"public", relay.Config{}, "198.51.100.7:9", 0},
		{"loopback refused", relay.Config{}, "127.0.0.1:9", 403},
		{"loopback allowed", relay.Config{AllowLoopbackPeers: true}, "127.0.0.1:9", 0},
		{"private refused", relay.Config{}, "10.1.2.3:9", 403},
		{"private 172.16/12", relay.Config{}, "172.20.0.1:9", 403},
		{"CGNAT refused", relay.Config{}, "100.64.0.1:9", 403},
		{"link-local refused", relay.Config{}, "169.254.1.1:9", 403},
		{"multicast refused", relay.Config{}, "224.0.0.251:9", 403},
		{"broadcast refused", relay.Config{}, "255.255.255.255:9", 403},
		{"this-network refused", relay.Config{}, "0.0.0.0:9", 403},
		{"private allowed", relay.Config{AllowPrivatePeers: true}, "10.1.2.3:9", 0},
		{"link-local allowed", relay.Config{AllowPrivatePeers: true}, "169.254.1.1:9", 0},
		{"denied prefix", relay.Config{DeniedPeers: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}}, "198.51.100.7:9", 403},
		{"denied beats allowed", relay.Config{AllowLoopbackPeers: true, DeniedPeers: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}, "127.0.0.1:9", 403},
		{"IPv6 peer on an IPv4 allocation", relay.Config{}, "[2001:db8::1]:9", 443},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.ListenUDP = "127.0.0.1:0"
			cfg.Users = map[string]string{relaytest.User: relaytest.Password}
			s, err := relay.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			c := dialTURN(t, "udp", s.Addrs()[relay.UDP][0], relaytest.User, relaytest.Password)
			c.allocate()
			peer := netip.MustParseAddrPort(tt.peer)
			if got := c.permit(peer); got != tt.want {
				t.Errorf("CreatePermission %v: %d, want %d", peer, got, tt.want)
			}
			if got := c.bind(0x4000, peer); got != tt.want {
				t.Errorf("ChannelBind %v: %d, want %d", peer, got, tt.want)
			}
		})
	}
}

func TestCreatePermissionAllOrNothing(t *testing.T) {
	_, c, relayed, p := relayPair(t, relay.Config{})
	if code := c.permit(p.addr, netip.MustParseAddrPort("10.0.0.1:1")); code != 403 {
		t.Fatalf("mixed request: %d, want 403", code)
	}
	p.sendTo(relayed, []byte("x"))
	if _, ok := c.next(300 * time.Millisecond); ok {
		t.Fatal("a refused CreatePermission installed a permission")
	}
}

func TestChannelBindRules(t *testing.T) {
	_, c, _, p := relayPair(t, relay.Config{})
	other := newPeer(t, "udp4", "127.0.0.1:0")
	steps := []struct {
		name string
		ch   uint16
		peer netip.AddrPort
		want int
	}{
		{"below range", 0x3FFF, p.addr, 400},
		{"above range", 0x8000, p.addr, 400},
		{"bind", 0x4000, p.addr, 0},
		{"refresh the same binding", 0x4000, p.addr, 0},
		{"channel reused for another peer", 0x4000, other.addr, 400},
		{"peer on a second channel", 0x4001, p.addr, 400},
		{"another channel, another peer", 0x4001, other.addr, 0},
		{"RFC 5766 range", 0x7FFF, netip.MustParseAddrPort("127.0.0.1:5"), 0},
	}
	for _, s := range steps {
		if got := c.bind(s.ch, s.peer); got != s.want {
			t.Errorf("%s: ChannelBind %#x %v: %d, want %d", s.name, s.ch, s.peer, got, s.want)
		}
	}
	r := c.request(stun.MethodChannelBind, peerAttr(p.addr))
	if got := errCode(r); got != 400 {
		t.Errorf("without CHANNEL-NUMBER: %d, want 400", got)
	}
}

func TestAllocateRequests(t *testing.T) {
	r := relaytest.Start(t, relay.Config{})
	tests := []struct {
		name  string
		attrs []stun.Setter
		want  int
	}{
		{"no REQUESTED-TRANSPORT", nil, 400},
		{"TCP relaying", []stun.Setter{rawAttr{stun.AttrRequestedTransport, []byte{6, 0, 0, 0}}}, 442},
		{"unknown comprehension-required attribute", []stun.Setter{udpTransport, rawAttr{0x0031, []byte{1, 2, 3, 4}}}, 420},
		{"bad address family", []stun.Setter{udpTransport, rawAttr{stun.AttrRequestedAddressFamily, []byte{3, 0, 0, 0}}}, 440},
		{"IPv6 without an IPv6 relay address", []stun.Setter{udpTransport, rawAttr{stun.AttrRequestedAddressFamily, []byte{2, 0, 0, 0}}}, 440},
		{"EVEN-PORT with a token", []stun.Setter{udpTransport, rawAttr{stun.AttrEvenPort, []byte{0}}, rawAttr{stun.AttrReservationToken, make([]byte, 8)}}, 400},
		{"unknown token", []stun.Setter{udpTransport, rawAttr{stun.AttrReservationToken, []byte{1, 2, 3, 4, 5, 6, 7, 8}}}, 508},
		{"comprehension-optional unknown is fine", []stun.Setter{udpTransport, rawAttr{0x8123, []byte{1}}}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
			if got := errCode(c.request(stun.MethodAllocate, tt.attrs...)); got != tt.want {
				t.Fatalf("got %d, want %d", got, tt.want)
			}
		})
	}
	t.Run("second allocation on a 5-tuple", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		c.allocate()
		if got := errCode(c.request(stun.MethodAllocate, udpTransport)); got != 437 {
			t.Fatalf("got %d, want 437", got)
		}
	})
	t.Run("retransmitted allocate gets the same answer", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		c.request(stun.MethodBinding) // learn nothing; makes the nonce below fresh
		c.request(stun.MethodRefresh) // 401 teaches realm and nonce, then 437
		m := c.build(stun.MethodAllocate, true, udpTransport)
		first, err := c.roundTrip(m)
		if err != nil || errCode(first) != 0 {
			t.Fatalf("allocate: %v %d", err, errCode(first))
		}
		again, err := c.roundTrip(m)
		if err != nil || !bytes.Equal(first.Raw, again.Raw) {
			t.Fatalf("retransmission answered differently (%v)", err)
		}
	})
	t.Run("EVEN-PORT with reservation", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		resp := c.request(stun.MethodAllocate, udpTransport, rawAttr{stun.AttrEvenPort, []byte{0x80}})
		if errCode(resp) != 0 {
			t.Fatalf("allocate: %d", errCode(resp))
		}
		relayed := xorAddrOf(t, resp, stun.AttrXORRelayedAddress)
		token, err := resp.Get(stun.AttrReservationToken)
		if relayed.Port()%2 != 0 || err != nil || len(token) != 8 {
			t.Fatalf("relayed %v, token %x (%v): want an even port and a token", relayed, token, err)
		}
		c2 := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		resp2 := c2.request(stun.MethodAllocate, udpTransport, rawAttr{stun.AttrReservationToken, token})
		if errCode(resp2) != 0 {
			t.Fatalf("allocate with token: %d", errCode(resp2))
		}
		if got := xorAddrOf(t, resp2, stun.AttrXORRelayedAddress); got.Port() != relayed.Port()+1 {
			t.Fatalf("token gave %v, want port %d", got, relayed.Port()+1)
		}
		c3 := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		if got := errCode(c3.request(stun.MethodAllocate, udpTransport, rawAttr{stun.AttrReservationToken, token})); got != 508 {
			t.Fatalf("token reused: %d, want 508", got)
		}
	})
	t.Run("binding request", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		resp := c.request(stun.MethodBinding)
		if got, want := xorAddrOf(t, resp, stun.AttrXORMappedAddress), c.conn.LocalAddr().String(); got.String() != want {
			t.Fatalf("mapped %v, want %v", got, want)
		}
	})
}

func TestAuthentication(t *testing.T) {
	const secret = "s3cret"
	clk := clock.NewFake(time.Unix(1_800_000_000, 0))
	r := relaytest.Start(t, relay.Config{
		Users:         map[string]string{"alice": "wonderland"},
		Secret:        secret,
		Clock:         clk,
		NonceLifetime: time.Minute,
	})
	now := clk.Now()
	restUser, restPass := relay.RESTCredentials(secret, "node1", now.Add(time.Hour))
	oldUser, oldPass := relay.RESTCredentials(secret, "node1", now.Add(-time.Second))
	tests := []struct {
		name, user, pass string
		want             int
	}{
		{"static user", "alice", "wonderland", 0},
		{"wrong password", "alice", "looking-glass", 401},
		{"unknown user", "bob", "wonderland", 401},
		{"REST credentials", restUser, restPass, 0},
		{"expired REST credentials", oldUser, oldPass, 401},
		{"REST user, wrong password", restUser, "AAAA", 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialTURN(t, "udp", r.UDP, tt.user, tt.pass)
			if got := errCode(c.request(stun.MethodAllocate, udpTransport)); got != tt.want {
				t.Fatalf("got %d, want %d", got, tt.want)
			}
		})
	}
	t.Run("challenge", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, "alice", "wonderland")
		resp, err := c.roundTrip(c.build(stun.MethodAllocate, false, udpTransport))
		if err != nil {
			t.Fatal(err)
		}
		var realm stun.Realm
		var nonce stun.Nonce
		if errCode(resp) != 401 || realm.GetFrom(resp) != nil || nonce.GetFrom(resp) != nil || string(realm) != "peerlink" {
			t.Fatalf("got %d realm %q nonce %q, want 401 with realm peerlink and a nonce", errCode(resp), realm, nonce)
		}
	})
	t.Run("stale nonce", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, "alice", "wonderland")
		c.allocate()
		old := c.nonce
		clk.Advance(2 * time.Minute)
		resp, err := c.roundTrip(c.build(stun.MethodRefresh, true))
		if err != nil || errCode(resp) != 438 {
			t.Fatalf("refresh with an old nonce: %d (%v), want 438", errCode(resp), err)
		}
		var nonce stun.Nonce
		if nonce.GetFrom(resp) != nil || string(nonce) == old {
			t.Fatal("438 without a fresh nonce")
		}
		if got := errCode(c.request(stun.MethodRefresh)); got != 0 {
			t.Fatalf("refresh with the fresh nonce: %d", got)
		}
	})
	t.Run("wrong user on an allocation", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, "alice", "wonderland")
		c.allocate()
		c.user, c.pass = restUser, restPass
		if got := errCode(c.request(stun.MethodRefresh)); got != 441 {
			t.Fatalf("got %d, want 441", got)
		}
	})
	t.Run("forged nonce", func(t *testing.T) {
		c := dialTURN(t, "udp", r.UDP, "alice", "wonderland")
		c.allocate()
		c.nonce = "AAAAAAAAAAAAAAAAAAAAAAAAAAA"
		resp, _ := c.roundTrip(c.build(stun.MethodRefresh, true))
		if errCode(resp) != 438 {
			t.Fatalf("got %d, want 438", errCode(resp))
		}
	})
}

func TestLifetimes(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_800_000_000, 0))
	r, c, relayed, p := relayPair(t, relay.Config{Clock: clk})
	if code := c.bind(0x4000, p.addr); code != 0 {
		t.Fatal(code)
	}
	lifetimeOf := func(m *stun.Message) time.Duration {
		v, err := m.Get(stun.AttrLifetime)
		if err != nil || len(v) != 4 {
			t.Fatalf("no LIFETIME: %v", err)
		}
		return time.Duration(uint32(v[0])<<24|uint32(v[1])<<16|uint32(v[2])<<8|uint32(v[3])) * time.Second
	}
	for _, tt := range []struct {
		ask  uint32
		want time.Duration
	}{{10, relay.DefaultLifetime}, {1200, 1200 * time.Second}, {100000, relay.MaxLifetime}} {
		if got := lifetimeOf(c.request(stun.MethodRefresh, lifetimeAttr(tt.ask))); got != tt.want {
			t.Errorf("refresh asking %d s: lifetime %v, want %v", tt.ask, got, tt.want)
		}
	}
	// The permission (refreshed by the ChannelBind) outlives 299 s, not 300 s; the
	// channel then relays nothing, though it is still bound.
	clk.Advance(299 * time.Second)
	sweep(t, r)
	p.sendTo(relayed, []byte("still permitted"))
	if _, ok := c.next(waitData); !ok {
		t.Fatal("permission expired early")
	}
	clk.Advance(2 * time.Second)
	sweep(t, r)
	p.sendTo(relayed, []byte("expired"))
	if _, ok := c.next(300 * time.Millisecond); ok {
		t.Fatal("permission outlived 300 s")
	}
	// Refresh 0 deletes at once.
	if got := lifetimeOf(c.request(stun.MethodRefresh, lifetimeAttr(0))); got != 0 {
		t.Fatalf("delete: lifetime %v", got)
	}
	waitFor(t, func() bool { return r.Stats().Sessions == 0 })

	// An allocation nobody refreshes ends after its lifetime.
	c2 := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	c2.allocate()
	clk.Advance(relay.DefaultLifetime - time.Second)
	sweep(t, r)
	if r.Stats().Sessions != 1 {
		t.Fatal("allocation ended before its lifetime")
	}
	clk.Advance(2 * time.Second)
	waitFor(t, func() bool { return r.Stats().Sessions == 0 })
	if got := errCode(c2.request(stun.MethodRefresh)); got != 437 {
		t.Fatalf("refresh after expiry: %d, want 437", got)
	}
}

func TestSessionLimits(t *testing.T) {
	t.Run("max sessions", func(t *testing.T) {
		const max = 200
		// All from one address: the per-source limits are off to reach MaxSessions.
		r := relaytest.Start(t, relay.Config{MaxSessions: max, PerSourceQuota: -1, RequestLimit: relay.RequestLimit{Disabled: true}})
		clients := make([]*turnClient, max)
		for i := range clients {
			clients[i] = dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
			clients[i].allocate()
		}
		extra := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		if got := errCode(extra.request(stun.MethodAllocate, udpTransport)); got != 486 {
			t.Fatalf("session %d of %d: %d, want 486", max+1, max, got)
		}
		clients[0].request(stun.MethodRefresh, lifetimeAttr(0))
		waitFor(t, func() bool { return r.Stats().Sessions == max-1 })
		if got := errCode(extra.request(stun.MethodAllocate, udpTransport)); got != 0 {
			t.Fatalf("after one ended: %d, want success", got)
		}
		if st := r.Stats(); st.Refused != 1 || st.SessionsTotal != max+1 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("per-user quota", func(t *testing.T) {
		r := relaytest.Start(t, relay.Config{PerUserQuota: 2, Users: map[string]string{"a": "1", "b": "2"}})
		for i, want := range []int{0, 0, 486} {
			c := dialTURN(t, "udp", r.UDP, "a", "1")
			if got := errCode(c.request(stun.MethodAllocate, udpTransport)); got != want {
				t.Fatalf("allocation %d of user a: %d, want %d", i+1, got, want)
			}
		}
		c := dialTURN(t, "udp", r.UDP, "b", "2")
		c.allocate()
	})
	t.Run("disable and enable", func(t *testing.T) {
		r, c, relayed, p := relayPair(t, relay.Config{})
		c.permit(p.addr)
		r.Disable()
		if r.Stats().Enabled {
			t.Fatal("Stats says enabled")
		}
		c2 := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
		if got := errCode(c2.request(stun.MethodAllocate, udpTransport)); got != 403 {
			t.Fatalf("allocate while disabled: %d, want 403", got)
		}
		p.sendTo(relayed, []byte("existing sessions carry on"))
		if _, ok := c.next(waitData); !ok {
			t.Fatal("disabling stopped an existing session")
		}
		r.Enable()
		c2.allocate()
	})
}

func TestBandwidthLimits(t *testing.T) {
	const limit = 200_000 // bytes per second
	tests := []struct {
		name     string
		cfg      relay.Config
		sessions int
		drop     relay.DropReason
	}{
		{"per session", relay.Config{BandwidthLimit: limit}, 1, relay.DropBandwidth},
		{"total capacity", relay.Config{TotalCapacity: limit}, 2, relay.DropCapacity},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := relaytest.Start(t, tt.cfg)
			p := newPeer(t, "udp4", "127.0.0.1:0")
			clients := make([]*turnClient, tt.sessions)
			for i := range clients {
				clients[i] = dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
				clients[i].allocate()
				if code := clients[i].bind(0x4000, p.addr); code != 0 {
					t.Fatal(code)
				}
			}
			// Offer twice the limit in all, paced, for 2 s, and measure what reaches
			// the peer after the first half second (the buckets start full).
			const size, offered = 1000, 2 * limit
			received := make(chan time.Time, 10000)
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer close(received)
				for {
					if _, _, ok := p.recv(300 * time.Millisecond); !ok {
						return
					}
					received <- time.Now()
				}
			}()
			payload := make([]byte, size)
			start := time.Now()
			for i := 0; time.Since(start) < 2*time.Second; i++ {
				clients[i%len(clients)].sendChannel(0x4000, payload)
				if ahead := time.Duration(i+1)*time.Second*size/offered - time.Since(start); ahead > 0 {
					time.Sleep(ahead)
				}
			}
			wg.Wait()
			n := 0
			from, to := start.Add(500*time.Millisecond), start.Add(2*time.Second)
			for at := range received {
				if !at.Before(from) && at.Before(to) {
					n++
				}
			}
			rate := float64(n*size) / to.Sub(from).Seconds()
			if rate < 0.9*limit || rate > 1.1*limit {
				t.Fatalf("relayed %.0f B/s with a limit of %d B/s", rate, limit)
			}
			if r.Stats().Dropped(tt.drop) == 0 {
				t.Fatalf("no drops counted as %v", tt.drop)
			}
			t.Logf("relayed %.0f B/s (limit %d, offered %d)", rate, limit, offered)
		})
	}
}

func TestIdleTimeout(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_800_000_000, 0))
	var mu sync.Mutex
	var ended []relay.SessionInfo
	r := relaytest.Start(t, relay.Config{
		Clock:          clk,
		SessionTimeout: 30 * time.Second,
		OnSessionEnd: func(si relay.SessionInfo) {
			mu.Lock()
			ended = append(ended, si)
			mu.Unlock()
		},
	})
	idle := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	idle.allocate()
	busy := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
	busy.allocate()
	p := newPeer(t, "udp4", "127.0.0.1:0")
	idle.permit(p.addr)
	busy.permit(p.addr)
	for range 40 {
		busy.sendIndication(p.addr, []byte("keepalive"))
		if _, _, ok := p.recv(waitData); !ok {
			t.Fatal("busy session relays nothing")
		}
		clk.Advance(time.Second)
		sweep(t, r)
	}
	waitFor(t, func() bool { return r.Stats().Sessions == 1 })
	mu.Lock()
	defer mu.Unlock()
	if len(ended) != 1 || ended[0].Reason != "idle" || ended[0].Client.String() != idle.conn.LocalAddr().String() {
		t.Fatalf("ended %+v, want the idle session, reason idle", ended)
	}
}

func TestSessionHooks(t *testing.T) {
	var mu sync.Mutex
	var started, ended []relay.SessionInfo
	r, c, relayed, p := relayPair(t, relay.Config{
		OnSessionStart: func(si relay.SessionInfo) { mu.Lock(); started = append(started, si); mu.Unlock() },
		OnSessionEnd:   func(si relay.SessionInfo) { mu.Lock(); ended = append(ended, si); mu.Unlock() },
	})
	if code := c.bind(0x4000, p.addr); code != 0 {
		t.Fatal(code)
	}
	var in, out uint64
	for i := range 20 {
		msg := bytes.Repeat([]byte{byte(i)}, 100+i)
		c.sendChannel(0x4000, msg)
		if _, _, ok := p.recv(waitData); !ok {
			t.Fatal("lost to peer")
		}
		in += uint64(len(msg))
		reply := bytes.Repeat([]byte{byte(i)}, 300+2*i)
		p.sendTo(relayed, reply)
		if _, ok := c.next(waitData); !ok {
			t.Fatal("lost to client")
		}
		out += uint64(len(reply))
	}
	c.request(stun.MethodRefresh, lifetimeAttr(0))
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(ended) == 1 })
	r.Close()
	mu.Lock()
	defer mu.Unlock()
	if len(started) != 1 || len(started[0].Peers) != 1 || started[0].Peers[0] != p.addr || started[0].Relayed != relayed || started[0].User != relaytest.User {
		t.Fatalf("started %+v", started)
	}
	e := ended[0]
	if e.BytesIn != in || e.BytesOut != out || e.PacketsIn != 20 || e.PacketsOut != 20 || e.Reason != "deleted" || e.ID != started[0].ID {
		t.Fatalf("ended %+v, want %d bytes in, %d out, 20 packets each way", e, in, out)
	}
	if e.Client.String() != c.conn.LocalAddr().String() || e.End.Before(e.Start) {
		t.Fatalf("ended %+v", e)
	}
}

func TestShutdownEndsSessions(t *testing.T) {
	var mu sync.Mutex
	var reasons []string
	r, c, _, p := relayPair(t, relay.Config{
		OnSessionEnd: func(si relay.SessionInfo) { mu.Lock(); reasons = append(reasons, si.Reason); mu.Unlock() },
	})
	c.permit(p.addr)
	tcp := dialTURN(t, "tcp", r.TCP, relaytest.User, relaytest.Password)
	tcp.allocate()
	tcp.permit(p.addr)
	r.Close()
	r.Close()
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(reasons) != "[shutdown shutdown]" {
		t.Fatalf("reasons %v", reasons)
	}
	if err := r.Start(); err != relay.ErrClosed {
		t.Fatalf("Start after Close: %v", err)
	}
}

// sweep waits until the relay has run a sweep at the fake clock's current time. The
// sweep runs asynchronously on the loop; a Binding request to the same loop after it is
// answered after it.
func sweep(t *testing.T, r *relaytest.Relay) {
	t.Helper()
	c := dialTURN(t, "udp", r.UDP, "", "")
	if _, err := c.roundTrip(c.build(stun.MethodBinding, false)); err != nil {
		t.Fatal(err)
	}
	c.close()
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
