package stun

import (
	"encoding/hex"
	"net/netip"
	"os"
	"strings"
	"testing"

	pion "github.com/pion/stun/v3"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// readHex reads a testdata file of hex bytes with # comments.
func readHex(t testing.TB, path string) []byte {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	for line := range strings.Lines(string(raw)) {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		sb.WriteString(strings.Join(strings.Fields(line), ""))
	}
	b, err := hex.DecodeString(sb.String())
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return b
}

// Addresses of the handler tests' pretend server: IP1, IP2 with ports 3478, 3479.
var (
	testAddrs = [4]netip.AddrPort{
		netip.MustParseAddrPort("192.0.2.1:3478"),
		netip.MustParseAddrPort("192.0.2.1:3479"),
		netip.MustParseAddrPort("192.0.2.2:3478"),
		netip.MustParseAddrPort("192.0.2.2:3479"),
	}
	testClient = netip.MustParseAddrPort("203.0.113.9:40000")
)

type handlerOpts struct {
	single    bool // no RFC 5780
	software  string
	rateLimit RateLimit
}

// newTestWorker returns a worker of a handler for testAddrs, without sockets.
func newTestWorker(o handlerOpts) *worker {
	addrs := testAddrs
	if o.single {
		addrs = [4]netip.AddrPort{testAddrs[0]}
	}
	rl := o.rateLimit
	if rl == (RateLimit{}) {
		rl.Disabled = true
	}
	h := new(handler)
	h.init(addrs, !o.single, o.software, rl)
	return &worker{h: h, c: new(counters)}
}

// msgBuilder builds test requests byte by byte, so they can be as wrong as a test needs.
type msgBuilder struct {
	typ     uint16
	classic bool // no magic cookie
	txID    [12]byte
	cookie  [4]byte
	attrs   []byte
	fp      bool // append a valid FINGERPRINT
	badFP   bool // append a wrong FINGERPRINT
}

func request() *msgBuilder {
	return &msgBuilder{typ: typeBindingRequest, txID: [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}
}

func (m *msgBuilder) attr(typ uint16, val []byte) *msgBuilder {
	m.attrs = be.AppendUint16(m.attrs, typ)
	m.attrs = be.AppendUint16(m.attrs, uint16(len(val)))
	m.attrs = append(m.attrs, val...)
	for len(m.attrs)%4 != 0 {
		m.attrs = append(m.attrs, 0)
	}
	return m
}

func (m *msgBuilder) change(c ChangeRequest) *msgBuilder {
	return m.attr(attrChangeRequest, []byte{0, 0, 0, byte(c)})
}

func (m *msgBuilder) bytes() []byte {
	b := be.AppendUint16(nil, m.typ)
	n := len(m.attrs)
	if m.fp || m.badFP {
		n += 8
	}
	b = be.AppendUint16(b, uint16(n))
	if m.classic {
		if m.cookie == [4]byte{} {
			m.cookie = [4]byte{0xde, 0xad, 0xbe, 0xef}
		}
		b = append(b, m.cookie[:]...)
	} else {
		b = be.AppendUint32(b, magicCookie)
	}
	b = append(b, m.txID[:]...)
	b = append(b, m.attrs...)
	if m.fp || m.badFP {
		crc := pion.FingerprintValue(b)
		if m.badFP {
			crc++
		}
		b = be.AppendUint16(b, attrFingerprint)
		b = be.AppendUint16(b, 4)
		b = be.AppendUint32(b, crc)
	}
	return b
}

// attrTypes lists the attribute types of a message in order.
func attrTypes(t testing.TB, msg []byte) []uint16 {
	t.Helper()
	var types []uint16
	it := newAttrIter(msg)
	for {
		typ, _, _, ok := it.next()
		if !ok {
			break
		}
		types = append(types, typ)
	}
	if it.err {
		t.Fatalf("attributes overrun the message % x", msg)
	}
	return types
}

func (c *counters) snapshot() (s [numCounters]uint64) {
	for i := range s {
		s[i] = c.c[i].Load()
	}
	return s
}
