package relay

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v3"
	"golang.org/x/sys/unix"
)

// FuzzHandle feeds arbitrary messages to the control path: raw (mode even), or, so the
// fuzzer gets past authentication, as the attributes of a correctly authenticated
// request of an arbitrary method on an existing allocation (mode odd). No input may
// panic, and every answer must be a well-formed response to the request.
func FuzzHandle(f *testing.F) {
	// Every input comes from one client: the request limit would answer most of them
	// with silence, and the fuzzer would learn nothing past it.
	s, err := New(Config{ListenUDP: "127.0.0.1:0", Users: map[string]string{"u": "p"}, RequestLimit: RequestLimit{Disabled: true}})
	if err != nil {
		f.Fatal(err)
	}
	// Disabled, so an Allocate is checked and refused before it opens sockets.
	s.Disable()
	l, err := newLoop(s)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(l.closeFDs)
	client := netip.MustParseAddrPort("192.0.2.10:5000")
	key := longTermKey("u", "peerlink", "p")

	seed := func(mode uint8, method stun.Method, attrs ...stun.Setter) {
		m := stun.MustBuild(append([]stun.Setter{stun.TransactionID, stun.NewType(method, stun.ClassRequest)}, attrs...)...)
		body := m.Raw[stunHeaderSize:]
		if mode%2 == 0 {
			body = m.Raw
		}
		f.Add(mode, uint16(method), body)
	}
	peer := stun.XORMappedAddress{IP: []byte{198, 51, 100, 1}, Port: 9}
	peerAttr := stun.RawAttribute{Type: stun.AttrXORPeerAddress}
	{
		m := stun.New()
		m.TransactionID = [12]byte{1}
		peer.AddToAs(m, stun.AttrXORPeerAddress)
		peerAttr.Value, _ = m.Get(stun.AttrXORPeerAddress)
	}
	seed(0, stun.MethodAllocate, rawAttr{stun.AttrRequestedTransport, []byte{17, 0, 0, 0}})
	seed(0, stun.MethodBinding)
	seed(1, stun.MethodAllocate, rawAttr{stun.AttrRequestedTransport, []byte{17, 0, 0, 0}}, rawAttr{stun.AttrEvenPort, []byte{0x80}})
	seed(1, stun.MethodRefresh, rawAttr{stun.AttrLifetime, []byte{0, 0, 0, 0}})
	seed(1, stun.MethodCreatePermission, peerAttr)
	seed(1, stun.MethodChannelBind, rawAttr{stun.AttrChannelNumber, []byte{0x40, 0, 0, 0}}, peerAttr)

	f.Fuzz(func(t *testing.T, mode uint8, method uint16, body []byte) {
		rc := &reqCtx{transport: UDP, client: client, loop: l, now: time.Now()}
		raw := body
		if mode%2 == 1 {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			rs := &relaySock{fd: fd, addr: netip.MustParseAddrPort("192.0.2.1:40000")}
			a := &allocation{srv: s, loop: l, rs: rs, user: "u", key: key, expires: rc.now.Add(time.Minute)}
			rs.alloc = a
			a.routes.Store(emptyRoutes)
			s.mu.Lock()
			s.sessions++
			s.perUser["u"]++
			s.mu.Unlock()
			l.owned[a] = struct{}{}
			defer l.removeAlloc(a, "test")
			rc.alloc = a
			if mode%4 == 3 {
				rc.alloc = nil // a request without an allocation
			}
			raw = authenticated(t, s, rc, stun.Method(method&0xFFF), body)
			if raw == nil {
				return
			}
		}
		resp := s.handle(rc, raw)
		if resp == nil {
			return
		}
		m := &stun.Message{Raw: append([]byte(nil), resp...)}
		if err := m.Decode(); err != nil {
			t.Fatalf("response does not decode: %v", err)
		}
		if m.TransactionID != rc.m.TransactionID || m.Type.Method != rc.m.Type.Method ||
			(m.Type.Class != stun.ClassSuccessResponse && m.Type.Class != stun.ClassErrorResponse) {
			t.Fatalf("response %v to request %v", m, &rc.m)
		}
	})
}

// authenticated wraps attribute bytes into a request with valid long-term credentials.
func authenticated(t *testing.T, s *Server, rc *reqCtx, method stun.Method, attrs []byte) []byte {
	if len(attrs)%4 != 0 || len(attrs) > 60000 {
		return nil
	}
	m := stun.New()
	m.Type = stun.NewType(method, stun.ClassRequest)
	m.TransactionID = [12]byte{7, 7, 7}
	m.WriteHeader()
	m.Raw = append(m.Raw, attrs...)
	m.Length = uint32(len(attrs))
	m.WriteLength()
	if err := m.Decode(); err != nil {
		return nil
	}
	for _, a := range []stun.Setter{stun.NewUsername("u"), stun.NewRealm("peerlink"), stun.NewNonce(s.auth.nonce(rc.client.Addr(), rc.now)),
		stun.NewLongTermIntegrity("u", "peerlink", "p")} {
		if err := a.AddTo(m); err != nil {
			return nil
		}
	}
	binary.BigEndian.PutUint16(m.Raw[2:], uint16(m.Length))
	return m.Raw
}
