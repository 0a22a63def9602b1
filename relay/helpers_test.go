package relay_test

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pion/stun/v3"
)

// turnClient is a deliberately plain TURN client for tests: it sends exactly what a test
// asks, so tests can probe the relay's answers to odd and wrong requests. It reads on a
// goroutine of its own, routing responses by transaction ID and everything else (data
// from peers) to data.
type turnClient struct {
	t      testing.TB
	conn   net.Conn
	stream bool
	user   string
	pass   string
	realm  string
	nonce  string

	mu      sync.Mutex
	pending map[[12]byte]chan *stun.Message
	data    chan []byte
	done    chan struct{}
}

func dialTURN(t testing.TB, network string, server netip.AddrPort, user, pass string) *turnClient {
	t.Helper()
	c, err := net.Dial(network, server.String())
	if err != nil {
		t.Fatal(err)
	}
	return newTURNClient(t, c, network != "udp", user, pass)
}

func newTURNClient(t testing.TB, c net.Conn, stream bool, user, pass string) *turnClient {
	tc := &turnClient{
		t: t, conn: c, stream: stream, user: user, pass: pass,
		pending: make(map[[12]byte]chan *stun.Message),
		data:    make(chan []byte, 1024),
		done:    make(chan struct{}),
	}
	go tc.read()
	t.Cleanup(tc.close)
	return tc
}

func (c *turnClient) close() {
	c.conn.Close()
	<-c.done
}

func (c *turnClient) read() {
	defer close(c.done)
	buf := make([]byte, 70000)
	for {
		var (
			b   []byte
			err error
		)
		if c.stream {
			b, err = readFrame(c.conn, buf)
		} else {
			var n int
			n, err = c.conn.Read(buf)
			b = buf[:n]
		}
		if err != nil {
			return
		}
		msg := append([]byte(nil), b...)
		if len(msg) >= 20 && msg[0]&0xC0 == 0 && binary.BigEndian.Uint16(msg)&0x0110 != 0x0010 {
			m := &stun.Message{Raw: msg}
			if m.Decode() == nil {
				c.mu.Lock()
				ch := c.pending[m.TransactionID]
				delete(c.pending, m.TransactionID)
				c.mu.Unlock()
				if ch != nil {
					ch <- m
				}
				continue
			}
		}
		select {
		case c.data <- msg:
		default:
		}
	}
}

// readFrame reads one TURN frame from a stream.
func readFrame(r io.Reader, buf []byte) ([]byte, error) {
	if _, err := io.ReadFull(r, buf[:4]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(buf[2:]))
	if buf[0]&0xC0 == 0x40 {
		n = (n + 3) &^ 3
	} else {
		n += 16
	}
	if _, err := io.ReadFull(r, buf[4:4+n]); err != nil {
		return nil, err
	}
	return buf[:4+n], nil
}

var errTimeout = errors.New("no response")

// send writes raw bytes to the relay.
func (c *turnClient) send(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

// await returns a channel that receives the response with transaction ID id.
func (c *turnClient) await(id [12]byte) chan *stun.Message {
	ch := make(chan *stun.Message, 1)
	c.mu.Lock()
	c.pending[id] = ch
	c.mu.Unlock()
	return ch
}

// roundTrip sends m and returns the response to it.
func (c *turnClient) roundTrip(m *stun.Message) (*stun.Message, error) {
	ch := c.await(m.TransactionID)
	if _, err := c.conn.Write(m.Raw); err != nil {
		return nil, err
	}
	select {
	case r := <-ch:
		return r, nil
	case <-time.After(3 * time.Second):
		return nil, errTimeout
	}
}

// request sends an authenticated request, learning the realm and nonce from a 401 or
// 438 and retrying, and returns the final response.
func (c *turnClient) request(method stun.Method, attrs ...stun.Setter) *stun.Message {
	c.t.Helper()
	var r *stun.Message
	for range 3 {
		m := c.build(method, true, attrs...)
		var err error
		if r, err = c.roundTrip(m); err != nil {
			c.t.Fatalf("%v: %v", method, err)
		}
		code := errCode(r)
		if code != 401 && code != 438 || !c.learn(r) {
			return r
		}
	}
	return r
}

// learn takes the realm and nonce from a challenge; it reports false when the
// challenge brings nothing new (wrong credentials).
func (c *turnClient) learn(r *stun.Message) bool {
	var realm stun.Realm
	var nonce stun.Nonce
	if realm.GetFrom(r) != nil || nonce.GetFrom(r) != nil {
		return false
	}
	fresh := string(nonce) != c.nonce || string(realm) != c.realm
	c.realm, c.nonce = string(realm), string(nonce)
	return fresh && (errCode(r) == 438 || c.realm != "")
}

// build makes a request; with auth and a known nonce it carries credentials.
func (c *turnClient) build(method stun.Method, auth bool, attrs ...stun.Setter) *stun.Message {
	c.t.Helper()
	setters := []stun.Setter{stun.TransactionID, stun.NewType(method, stun.ClassRequest)}
	setters = append(setters, attrs...)
	if auth && c.nonce != "" {
		setters = append(setters, stun.NewUsername(c.user), stun.NewRealm(c.realm), stun.NewNonce(c.nonce),
			stun.NewLongTermIntegrity(c.user, c.realm, c.pass))
	}
	setters = append(setters, stun.Fingerprint)
	m, err := stun.Build(setters...)
	if err != nil {
		c.t.Fatal(err)
	}
	return m
}

// allocate allocates and returns the relayed address; it fails the test on an error.
func (c *turnClient) allocate(attrs ...stun.Setter) netip.AddrPort {
	c.t.Helper()
	r := c.request(stun.MethodAllocate, append([]stun.Setter{udpTransport}, attrs...)...)
	if r.Type.Class != stun.ClassSuccessResponse {
		c.t.Fatalf("allocate: %d", errCode(r))
	}
	if err := stun.MessageIntegrity(longTermKey(c.user, c.realm, c.pass)).Check(r); err != nil {
		c.t.Fatalf("allocate response integrity: %v", err)
	}
	return xorAddrOf(c.t, r, stun.AttrXORRelayedAddress)
}

func (c *turnClient) permit(peers ...netip.AddrPort) int {
	c.t.Helper()
	var attrs []stun.Setter
	for _, p := range peers {
		attrs = append(attrs, peerAttr(p))
	}
	return errCode(c.request(stun.MethodCreatePermission, attrs...))
}

func (c *turnClient) bind(ch uint16, peer netip.AddrPort) int {
	c.t.Helper()
	return errCode(c.request(stun.MethodChannelBind, channelAttr(ch), peerAttr(peer)))
}

// sendChannel sends a ChannelData message (padded on streams).
func (c *turnClient) sendChannel(ch uint16, payload []byte) {
	c.t.Helper()
	n := 4 + len(payload)
	if c.stream {
		n = (n + 3) &^ 3
	}
	b := make([]byte, n)
	binary.BigEndian.PutUint16(b, ch)
	binary.BigEndian.PutUint16(b[2:], uint16(len(payload)))
	copy(b[4:], payload)
	c.send(b)
}

// sendIndication sends a Send indication to peer.
func (c *turnClient) sendIndication(peer netip.AddrPort, payload []byte) {
	c.t.Helper()
	m, err := stun.Build(stun.TransactionID, stun.NewType(stun.MethodSend, stun.ClassIndication),
		peerAttr(peer), rawAttr{stun.AttrData, payload}, stun.Fingerprint)
	if err != nil {
		c.t.Fatal(err)
	}
	c.send(m.Raw)
}

// next returns the next data message (ChannelData or Data indication) from the relay.
func (c *turnClient) next(timeout time.Duration) ([]byte, bool) {
	select {
	case b := <-c.data:
		return b, true
	case <-time.After(timeout):
		return nil, false
	}
}

func longTermKey(user, realm, pass string) []byte {
	return stun.NewLongTermIntegrity(user, realm, pass)
}

func errCode(m *stun.Message) int {
	if m.Type.Class == stun.ClassSuccessResponse {
		return 0
	}
	var ec stun.ErrorCodeAttribute
	if ec.GetFrom(m) != nil {
		return -1
	}
	return int(ec.Code)
}

func xorAddrOf(t testing.TB, m *stun.Message, at stun.AttrType) netip.AddrPort {
	t.Helper()
	var a stun.XORMappedAddress
	if err := a.GetFromAs(m, at); err != nil {
		t.Fatalf("%v: %v", at, err)
	}
	ip, _ := netip.AddrFromSlice(a.IP)
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port))
}

type rawAttr struct {
	t stun.AttrType
	v []byte
}

func (r rawAttr) AddTo(m *stun.Message) error { m.Add(r.t, r.v); return nil }

var udpTransport = rawAttr{stun.AttrRequestedTransport, []byte{17, 0, 0, 0}}

func channelAttr(ch uint16) rawAttr {
	return rawAttr{stun.AttrChannelNumber, []byte{byte(ch >> 8), byte(ch), 0, 0}}
}

func lifetimeAttr(seconds uint32) rawAttr {
	v := make([]byte, 4)
	binary.BigEndian.PutUint32(v, seconds)
	return rawAttr{stun.AttrLifetime, v}
}

func peerAttr(p netip.AddrPort) stun.Setter {
	return xorSetter{stun.AttrXORPeerAddress, p}
}

type xorSetter struct {
	t stun.AttrType
	p netip.AddrPort
}

func (x xorSetter) AddTo(m *stun.Message) error {
	a := stun.XORMappedAddress{IP: net.IP(x.p.Addr().AsSlice()), Port: int(x.p.Port())}
	return a.AddToAs(m, x.t)
}

// peer is a plain UDP socket standing for a peer on the far side of the relay.
type peer struct {
	t    testing.TB
	conn *net.UDPConn
	addr netip.AddrPort
	buf  []byte
}

func newPeer(t testing.TB, network, addr string) *peer {
	t.Helper()
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &peer{t: t, conn: c, addr: c.LocalAddr().(*net.UDPAddr).AddrPort(), buf: make([]byte, 70000)}
}

func (p *peer) sendTo(to netip.AddrPort, b []byte) {
	p.t.Helper()
	if _, err := p.conn.WriteToUDPAddrPort(b, to); err != nil {
		p.t.Fatal(err)
	}
}

// recv returns the next datagram and its source, or false after timeout.
func (p *peer) recv(timeout time.Duration) ([]byte, netip.AddrPort, bool) {
	p.conn.SetReadDeadline(time.Now().Add(timeout))
	n, from, err := p.conn.ReadFromUDPAddrPort(p.buf)
	if err != nil {
		return nil, netip.AddrPort{}, false
	}
	return p.buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), true
}

// decodeData unpacks a ChannelData message or Data indication from the relay.
func decodeData(t testing.TB, b []byte) (ch uint16, from netip.AddrPort, payload []byte) {
	t.Helper()
	if b[0]&0xC0 == 0x40 {
		n := int(binary.BigEndian.Uint16(b[2:]))
		return binary.BigEndian.Uint16(b), netip.AddrPort{}, b[4 : 4+n]
	}
	m := &stun.Message{Raw: b}
	if err := m.Decode(); err != nil {
		t.Fatal(err)
	}
	if m.Type != stun.NewType(stun.MethodData, stun.ClassIndication) {
		t.Fatalf("unexpected message %v", m.Type)
	}
	data, err := m.Get(stun.AttrData)
	if err != nil {
		t.Fatal(err)
	}
	return 0, xorAddrOf(t, m, stun.AttrXORPeerAddress), data
}
