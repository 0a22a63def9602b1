package connect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/mdns"
	"peerlink/natlab"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// lanBook is an emulated link's discovery: where each NodeID claims to be. Tests forge
// entries in it as a hostile mDNS responder would.
type lanBook struct {
	mu    sync.Mutex
	addrs map[identity.NodeID][]netip.AddrPort
}

func (b *lanBook) set(id identity.NodeID, a ...netip.AddrPort) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.addrs == nil {
		b.addrs = map[identity.NodeID][]netip.AddrPort{}
	}
	b.addrs[id] = a
}

func (b *lanBook) lookup(ctx context.Context, id identity.NodeID) ([]netip.AddrPort, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if a, ok := b.addrs[id]; ok {
		return a, nil
	}
	return nil, errors.New("no such node on the link")
}

// lanNode starts a LAN-only node (no rendezvous server, no STUN) on h.
func lanNode(t *testing.T, h *natlab.Host, book *lanBook) *Node {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := Start(ctx, Config{Identity: id, Net: h, LocalIPs: func() ([]netip.Addr, error) { return h.Addrs(), nil },
		LAN: &LANConfig{Lookup: book.lookup}})
	if err != nil {
		t.Fatalf("starting %s: %v", h.Name(), err)
	}
	t.Cleanup(func() { n.Close() })
	book.set(id.NodeID(), netip.AddrPortFrom(h.Addr(), n.main.LocalAddr().Port()))
	return n
}

// forgedAnswerer answers every hello on pc as if it came from claim, with a MAC it
// cannot compute.
func forgedAnswerer(t *testing.T, pc net.PacketConn, claim identity.NodeID) {
	t.Helper()
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, kind, payload, ok := parseFrame(buf[:k])
			if !ok || kind != kindHello {
				continue
			}
			m, err := parseLANMessage(payload)
			if err != nil {
				continue
			}
			ack := lanMessage{session: m.session, from: claim, to: m.from, at: time.Now()}
			pc.WriteTo(appendFrame(nil, 0, kindHelloAck, ack.seal(make([]byte, 32), kindHelloAck)), from)
		}
	}()
}

// TestLANConnectEmulated connects nodes behind one emulated NAT with no rendezvous
// server or STUN, found through a discovery book that tests can forge.
func TestLANConnectEmulated(t *testing.T) {
	tests := []struct {
		name    string
		forge   func(t *testing.T, w *natlab.NAT, book *lanBook, target identity.NodeID) *Node // returns an impostor node, if any
		wantErr error
	}{
		{name: "found and connected"},
		{
			name: "impostor node at the advertised address",
			forge: func(t *testing.T, r *natlab.NAT, book *lanBook, target identity.NodeID) *Node {
				m := lanNode(t, r.AddHost("impostor", netip.MustParseAddr("192.168.0.9")), book)
				book.set(target, book.addrs[m.NodeID()]...)
				return m
			},
			wantErr: ErrPeerMismatch,
		},
		{
			name: "forged answer without the key",
			forge: func(t *testing.T, r *natlab.NAT, book *lanBook, target identity.NodeID) *Node {
				h := r.AddHost("forger", netip.MustParseAddr("192.168.0.9"))
				pc, err := h.ListenPacket(context.Background(), "udp4", ":7000")
				if err != nil {
					t.Fatal(err)
				}
				forgedAnswerer(t, pc, target)
				book.set(target, netip.AddrPortFrom(h.Addr(), 7000))
				return nil
			},
			wantErr: ErrPeerMismatch,
		},
		{
			name: "not on the link",
			forge: func(t *testing.T, r *natlab.NAT, book *lanBook, target identity.NodeID) *Node {
				book.set(target)
				return nil
			},
			wantErr: ErrPeerOffline,
		},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := natlab.New(natlab.Config{Seed: uint64(i + 1)})
			t.Cleanup(func() { w.Close() })
			r := w.AddNAT(natlab.NATConfig{Name: "home", PublicIP: netip.MustParseAddr("198.51.100.1")})
			book := &lanBook{}
			a := lanNode(t, r.AddHost("a", netip.MustParseAddr("192.168.0.2")), book)
			b := lanNode(t, r.AddHost("b", netip.MustParseAddr("192.168.0.3")), book)
			if tt.forge == nil {
				c, err := pair(t, a, b, Options{Timeout: 5 * time.Second})
				if err != nil {
					t.Fatal(err)
				}
				if c.Method() != MethodDirect || c.Technique().String() != "local" {
					t.Errorf("method %v technique %v, want direct local", c.Method(), c.Technique())
				}
				t.Logf("first path after %v", c.Stats().FirstPath)
				return
			}
			// B is not on the link under its NodeID: whatever answers there must fail.
			b.Close()
			impostor := tt.forge(t, r, book, b.NodeID())
			start := time.Now()
			_, err := a.Connect(context.Background(), b.NodeID(), Options{Timeout: 1500 * time.Millisecond})
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			t.Logf("refused after %v: %v", time.Since(start).Round(time.Millisecond), err)
			if impostor != nil {
				if p := impostor.Pending(); len(p) > 0 {
					t.Errorf("the impostor has connections: %+v", p)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
				defer cancel()
				if c, err := impostor.Accept(ctx); err == nil {
					t.Errorf("the impostor accepted a connection from %s", c.Peer().Short())
				}
			}
		})
	}
}

// TestLANHelloChecks sends hand-made hellos to a LAN node and checks which it accepts.
func TestLANHelloChecks(t *testing.T) {
	w := natlab.New(natlab.Config{Seed: 7})
	t.Cleanup(func() { w.Close() })
	r := w.AddNAT(natlab.NATConfig{Name: "home", PublicIP: netip.MustParseAddr("198.51.100.1")})
	book := &lanBook{}
	b := lanNode(t, r.AddHost("b", netip.MustParseAddr("192.168.0.3")), book)
	bAddr := book.addrs[b.NodeID()][0]
	h := r.AddHost("sender", netip.MustParseAddr("192.168.0.2"))
	pc, err := h.ListenPacket(context.Background(), "udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	sender, _ := identity.Generate()
	other, _ := identity.Generate()
	replayed := newSession()

	hello := func(from *identity.Identity, to identity.NodeID, session string, at time.Time, badKey bool) []byte {
		key, err := from.SharedKey(to, []byte("lan\n"+session), 32)
		if err != nil {
			t.Fatal(err)
		}
		if badKey {
			key = make([]byte, 32)
		}
		return appendFrame(nil, 0, kindHello, lanMessage{session: session, from: from.NodeID(), to: to, at: at}.seal(key, kindHello))
	}
	tests := []struct {
		name   string
		frame  []byte
		accept bool
		// answeredAs is who the answer must say it is from (zero: no answer).
		answeredAs identity.NodeID
	}{
		{"good hello", hello(sender, b.NodeID(), replayed, time.Now(), false), true, b.NodeID()},
		{"replayed after the connection closed", hello(sender, b.NodeID(), replayed, time.Now(), false), false, identity.NodeID{}},
		{"stale timestamp", hello(sender, b.NodeID(), newSession(), time.Now().Add(-10*time.Minute), false), false, identity.NodeID{}},
		{"wrong key", hello(sender, b.NodeID(), newSession(), time.Now(), true), false, identity.NodeID{}},
		{"addressed to another node", hello(sender, other.NodeID(), newSession(), time.Now(), false), false, b.NodeID()},
		{"truncated", hello(sender, b.NodeID(), newSession(), time.Now(), false)[:40], false, identity.NodeID{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := pc.WriteTo(tt.frame, net.UDPAddrFromAddrPort(bAddr)); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			c, err := b.Accept(ctx)
			if got := err == nil; got != tt.accept {
				t.Fatalf("accepted %v, want %v (err %v)", got, tt.accept, err)
			}
			if c != nil {
				if c.Peer() != sender.NodeID() || c.Method() != MethodDirect {
					t.Errorf("accepted %s by %v, want %s direct", c.Peer().Short(), c.Method(), sender.NodeID().Short())
				}
				c.Close()
			}
			pc.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			buf := make([]byte, 2048)
			var answer identity.NodeID
			for {
				k, _, err := pc.ReadFrom(buf)
				if err != nil {
					break
				}
				if _, kind, payload, ok := parseFrame(buf[:k]); ok && kind == kindHelloAck {
					m, err := parseLANMessage(payload)
					if err != nil {
						t.Fatal(err)
					}
					key, _ := sender.SharedKey(m.from, []byte("lan\n"+m.session), 32)
					if !m.verify(payload, key, kindHelloAck) {
						t.Errorf("answer from %s does not verify", m.from.Short())
					}
					answer = m.from
				}
			}
			if answer != tt.answeredAs {
				t.Errorf("answered as %q, want %q", answer.Short(), tt.answeredAs.Short())
			}
		})
	}
}

// TestLANWithRendezvousFallsBack: with a rendezvous server, a forged LAN record costs
// only the handshake's wait; the connection is made through signaling.
func TestLANWithRendezvousFallsBack(t *testing.T) {
	sigSrv := signaltest.Start(t, signal.Config{}, false)
	w := newWorld(t, 3, sigSrv)
	book := &lanBook{}
	wrap := func(o nodeOpts) nodeOpts {
		o.lan = &LANConfig{Lookup: book.lookup, Wait: 200 * time.Millisecond, Handshake: 300 * time.Millisecond}
		return o
	}
	a := w.node("a", wrap(nodeOpts{typ: mustType(t, "ei-pd-pp")}))
	b := w.node("b", wrap(nodeOpts{typ: mustType(t, "ei-pd-pp")}))
	// A forged record for B: an address nobody answers at.
	book.set(b.NodeID(), netip.MustParseAddrPort("192.168.1.77:9"))
	c, err := pair(t, a, b, Options{Timeout: 8 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if c.Technique().String() == "local" {
		t.Errorf("technique local: the forged record was used")
	}
	t.Logf("%v via %v after %v", c.Method(), c.Technique(), c.Stats().FirstPath)
}

// TestLANDiscoveryLab runs LAN-only nodes on a kernel LAN (a bridge between network
// namespaces) with real mDNS and nothing else reachable: no rendezvous, no STUN.
func TestLANDiscoveryLab(t *testing.T) {
	netlabtest.Need(t)
	lan := netlabtest.StartLAN(t, netlab.LANConfig{Hosts: 3})
	start := func(h *netlab.Host) *Node {
		t.Helper()
		id, err := identity.Generate()
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		n, err := Start(ctx, Config{Identity: id, Net: h, LocalIPs: func() ([]netip.Addr, error) { return h.IPs, nil }, Logger: labLogger(h.Name),
			// A rendezvous server and STUN server that do not exist: as if offline.
			STUN: []string{"192.0.2.1:3478"},
			LAN:  &LANConfig{Do: h.Do, MDNS: mdns.Config{Interfaces: []string{"eth0"}}}})
		if err != nil {
			t.Errorf("%s: %v", h.Name, err)
			return nil
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	// Profiling waits for STUN answers that never come: start the nodes together.
	nodes := make([]*Node, 3)
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Go(func() { nodes[i] = start(lan.Hosts[i]) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	a, b, m := nodes[0], nodes[1], nodes[2]

	t.Run("connect by NodeID", func(t *testing.T) {
		began := time.Now()
		c, err := pair(t, a, b, Options{Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if c.Method() != MethodDirect || c.Technique().String() != "local" {
			t.Errorf("method %v technique %v, want direct local", c.Method(), c.Technique())
		}
		t.Logf("connected over the LAN in %v (path %v)", time.Since(began).Round(time.Millisecond), c.Stats().FirstPath)
	})

	t.Run("forged mDNS record", func(t *testing.T) {
		// On m's host, a record for a NodeID m does not hold, pointing at m's node.
		victim, _ := identity.Generate()
		var adv *mdns.Advertiser
		err := lan.Hosts[2].Do(func() error {
			var err error
			adv, err = mdns.Advertise(context.Background(), mdns.Config{Interfaces: []string{"eth0"}}, mdns.Service{NodeID: victim.NodeID(), Port: m.main.LocalAddr().Port()})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer adv.Close()
		began := time.Now()
		_, err = a.Connect(context.Background(), victim.NodeID(), Options{Timeout: 5 * time.Second})
		if !errors.Is(err, ErrPeerMismatch) {
			t.Fatalf("err %v, want ErrPeerMismatch", err)
		}
		t.Logf("refused after %v: %v", time.Since(began).Round(time.Millisecond), err)
		if p := m.Pending(); len(p) > 0 {
			t.Errorf("the impostor has connections: %+v", p)
		}
	})
}

func FuzzLANMessage(f *testing.F) {
	id, _ := identity.Generate()
	peer, _ := identity.Generate()
	session := newSession()
	key, _ := id.SharedKey(peer.NodeID(), []byte("lan\n"+session), 32)
	good := lanMessage{session: session, from: id.NodeID(), to: peer.NodeID(), at: time.Unix(1700000000, 0)}.seal(key, kindHello)
	f.Add(good)
	f.Add(good[:lanBodyLen])
	f.Add([]byte{})
	bad := append([]byte(nil), good...)
	bad[0] = 9
	f.Add(bad)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseLANMessage(b)
		if err != nil {
			return
		}
		// A message that parses seals back to the same body under any key.
		again := m.seal(key, kindHello)
		if string(again[:lanBodyLen]) != string(b[:lanBodyLen]) {
			t.Fatalf("round trip changed the body:\n%x\n%x", b[:lanBodyLen], again[:lanBodyLen])
		}
		if !m.verify(again, key, kindHello) {
			t.Fatal("a sealed message does not verify")
		}
	})
}
