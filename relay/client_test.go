package relay_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/turn/v4"

	"peerlink/relay"
	"peerlink/relay/relaytest"
)

// selfSigned returns a server config with a certificate for 127.0.0.1 and a client
// config that trusts it.
func selfSigned(t testing.TB) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "peerlink relay test"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}},
		&tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
}

// exchange sends a message each way between two relayed connections and checks both
// arrive from the other's relayed address.
func exchange(t *testing.T, a, b net.PacketConn) {
	t.Helper()
	// Each side needs a permission for the other: a first write installs it.
	for _, c := range []struct{ from, to net.PacketConn }{{a, b}, {b, a}} {
		if _, err := c.from.WriteTo([]byte("hello"), c.to.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}
	for _, dir := range []struct {
		from, to net.PacketConn
		msg      []byte
	}{{a, b, []byte("ping through the relay")}, {b, a, bytes.Repeat([]byte("pong"), 300)}} {
		// The first write installs the permission; resend until the other side hears,
		// since the other side's permission may not be there yet.
		got := make(chan []byte, 1)
		go func() {
			buf := make([]byte, 2000)
			dir.to.SetReadDeadline(time.Now().Add(5 * time.Second))
			for {
				n, from, err := dir.to.ReadFrom(buf)
				if err != nil {
					close(got)
					return
				}
				if from.String() == dir.from.LocalAddr().String() && bytes.Equal(buf[:n], dir.msg) {
					got <- append([]byte(nil), buf[:n]...)
					return
				}
			}
		}()
		deadline := time.Now().Add(5 * time.Second)
		for received := false; !received; {
			if _, err := dir.from.WriteTo(dir.msg, dir.to.LocalAddr()); err != nil {
				t.Fatal(err)
			}
			select {
			case m, ok := <-got:
				if !ok || !bytes.Equal(m, dir.msg) {
					t.Fatalf("got %q (ok %v)", m, ok)
				}
				received = true
			case <-time.After(200 * time.Millisecond):
				if time.Now().After(deadline) {
					t.Fatal("nothing relayed")
				}
			}
		}
		dir.to.SetReadDeadline(time.Time{})
	}
}

func TestDialTransports(t *testing.T) {
	serverTLS, clientTLS := selfSigned(t)
	r := relaytest.Start(t, relay.Config{ListenTLS: "127.0.0.1:0", TLSConfig: serverTLS})
	ctx := context.Background()
	for _, tt := range []struct {
		transport relay.Transport
		server    netip.AddrPort
	}{
		{relay.UDP, r.UDP},
		{relay.TCP, r.TCP},
		{relay.TLS, r.Addrs()[relay.TLS][0]},
	} {
		t.Run(string(tt.transport), func(t *testing.T) {
			cfg := relay.ClientConfig{Server: tt.server.String(), Transport: tt.transport,
				Username: relaytest.User, Password: relaytest.Password, TLSConfig: clientTLS}
			a, err := relay.Dial(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			b, err := relay.Dial(ctx, relay.ClientConfig{Server: r.UDP.String(), Username: relaytest.User, Password: relaytest.Password})
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			if ap := a.RelayedAddr().(*net.UDPAddr).AddrPort(); ap.Addr() != netip.MustParseAddr("127.0.0.1") {
				t.Fatalf("relayed %v", ap)
			}
			exchange(t, a, b)
		})
	}
}

func TestDialErrors(t *testing.T) {
	r := relaytest.Start(t, relay.Config{})
	ctx := context.Background()
	_, err := relay.Dial(ctx, relay.ClientConfig{Server: r.UDP.String(), Username: relaytest.User, Password: "wrong"})
	if err == nil {
		t.Fatal("allocated with a wrong password")
	}
	r.Disable()
	_, err = relay.Dial(ctx, relay.ClientConfig{Server: r.TCP.String(), Transport: relay.TCP, Username: relaytest.User, Password: relaytest.Password})
	if err == nil {
		t.Fatal("allocated from a disabled relay")
	}
	// A server that never answers: the context bounds the wait.
	silent := newPeer(t, "udp4", "127.0.0.1:0")
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := relay.Dial(cctx, relay.ClientConfig{Server: silent.addr.String(), Username: "u", Password: "p"}); err == nil {
		t.Fatal("allocated from a silent server")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Dial took %v after its context ended", d)
	}
}

// TestPionClient drives the relay with pion/turn's client directly, as other TURN
// software would.
func TestPionClient(t *testing.T) {
	r := relaytest.Start(t, relay.Config{})
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c, err := turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: r.UDP.String(), TURNServerAddr: r.UDP.String(),
		Username: relaytest.User, Password: relaytest.Password, Conn: conn,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	mapped, err := c.SendBindingRequest()
	if err != nil || mapped.String() != conn.LocalAddr().String() {
		t.Fatalf("binding: %v %v", mapped, err)
	}
	relayed, err := c.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	defer relayed.Close()
	p := newPeer(t, "udp4", "127.0.0.1:0")
	if _, err := relayed.WriteTo([]byte("from pion"), net.UDPAddrFromAddrPort(p.addr)); err != nil {
		t.Fatal(err)
	}
	got, from, ok := p.recv(5 * time.Second)
	if !ok || string(got) != "from pion" || from.String() != relayed.LocalAddr().String() {
		t.Fatalf("peer got %q from %v", got, from)
	}
	p.sendTo(from, []byte("to pion"))
	buf := make([]byte, 100)
	relayed.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, src, err := relayed.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "to pion" || src.String() != p.addr.String() {
		t.Fatalf("pion got %q from %v: %v", buf[:n], src, err)
	}
}

func TestIPv6(t *testing.T) {
	probe, err := net.ListenPacket("udp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	probe.Close()
	r := relaytest.Start(t, relay.Config{ListenUDP: "[::1]:0", ListenTCP: "[::1]:0", RelayIP: netip.MustParseAddr("127.0.0.1")})
	for _, tt := range []struct {
		name   string
		family byte
		want   netip.Addr
		peer   string
	}{
		{"IPv6 relay by default on an IPv6 listener", 0, netip.MustParseAddr("::1"), "[::1]:0"},
		{"IPv4 relay asked for over IPv6", 1, netip.MustParseAddr("127.0.0.1"), "127.0.0.1:0"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := dialTURN(t, "udp", r.UDP, relaytest.User, relaytest.Password)
			var relayed netip.AddrPort
			if tt.family == 0 {
				relayed = c.allocate(rawAttr{0x0017, []byte{2, 0, 0, 0}})
			} else {
				relayed = c.allocate(rawAttr{0x0017, []byte{tt.family, 0, 0, 0}})
			}
			if relayed.Addr() != tt.want {
				t.Fatalf("relayed %v, want on %v", relayed, tt.want)
			}
			network := "udp6"
			if tt.want.Is4() {
				network = "udp4"
			}
			p := newPeer(t, network, tt.peer)
			if code := c.bind(0x4000, p.addr); code != 0 {
				t.Fatalf("ChannelBind: %d", code)
			}
			c.sendChannel(0x4000, []byte("v6 world"))
			if got, from, ok := p.recv(waitData); !ok || string(got) != "v6 world" || from != relayed {
				t.Fatalf("peer got %q from %v", got, from)
			}
			p.sendTo(relayed, []byte("reply"))
			b, ok := c.next(waitData)
			if !ok {
				t.Fatal("no reply")
			}
			if ch, _, payload := decodeData(t, b); ch != 0x4000 || string(payload) != "reply" {
				t.Fatalf("got %#x %q", ch, payload)
			}
			other := netip.MustParseAddrPort("198.51.100.1:9")
			if tt.want.Is4() {
				other = netip.MustParseAddrPort("[2001:db8::1]:9")
			}
			if code := c.permit(other); code != 443 {
				t.Fatalf("peer of the other family: %d, want 443", code)
			}
		})
	}
}
