package relay

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/pion/stun/v3"
)

func TestParseChannelData(t *testing.T) {
	tests := []struct {
		name    string
		b       []byte
		ch      uint16
		payload []byte
		err     error
	}{
		{"minimal", []byte{0x40, 0x00, 0x00, 0x00}, 0x4000, []byte{}, nil},
		{"payload", []byte{0x40, 0x01, 0x00, 0x02, 'h', 'i'}, 0x4001, []byte("hi"), nil},
		{"padding ignored", []byte{0x7f, 0xff, 0x00, 0x01, 'x', 0, 0, 0}, 0x7fff, []byte("x"), nil},
		{"short header", []byte{0x40, 0x00, 0x00}, 0, nil, ErrTruncated},
		{"truncated payload", []byte{0x40, 0x00, 0x00, 0x05, 1, 2}, 0, nil, ErrTruncated},
		{"channel out of range", []byte{0x80, 0x00, 0x00, 0x00}, 0, nil, ErrMalformed},
		{"channel below range", []byte{0x3f, 0xff, 0x00, 0x00}, 0, nil, ErrMalformed},
	}
	for _, tt := range tests {
		ch, payload, err := parseChannelData(tt.b)
		if !errors.Is(err, tt.err) || ch != tt.ch || !bytes.Equal(payload, tt.payload) {
			t.Errorf("%s: got %#x %q %v, want %#x %q %v", tt.name, ch, payload, err, tt.ch, tt.payload, tt.err)
		}
	}
}

func TestFrameLen(t *testing.T) {
	tests := []struct {
		name string
		b    []byte
		n    int
		err  error
	}{
		{"too short", []byte{0, 1, 0}, 0, nil},
		{"STUN", []byte{0, 1, 0, 8, 0x21, 0x12, 0xa4, 0x42}, 28, nil},
		{"STUN, cookie not yet read", []byte{0, 1, 0, 8}, 28, nil},
		{"STUN odd length", []byte{0, 1, 0, 6}, 0, ErrMalformed},
		{"STUN bad cookie", []byte{0, 1, 0, 8, 1, 2, 3, 4}, 0, ErrMalformed},
		{"ChannelData padded", []byte{0x40, 0, 0, 5}, 12, nil},
		{"ChannelData aligned", []byte{0x40, 0, 0, 8}, 12, nil},
		{"reserved", []byte{0x80, 0, 0, 0}, 0, ErrMalformed},
		{"reserved high", []byte{0xc0, 0, 0, 0}, 0, ErrMalformed},
	}
	for _, tt := range tests {
		n, err := frameLen(tt.b)
		if n != tt.n || !errors.Is(err, tt.err) {
			t.Errorf("%s: got %d %v, want %d %v", tt.name, n, err, tt.n, tt.err)
		}
	}
}

// chunkReader returns a stream a few bytes at a time, as TCP may.
type chunkReader struct {
	b     []byte
	chunk int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.chunk)], r.b)
	r.b = r.b[n:]
	return n, nil
}

func TestFrameReader(t *testing.T) {
	var stream []byte
	var want [][]byte
	for i := range 50 {
		var f []byte
		if i%2 == 0 {
			m := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
			m.Add(0x8099, bytes.Repeat([]byte{'a'}, i*37))
			f = m.Raw
		} else {
			f = make([]byte, 4+pad4(i*101))
			putChannelHeader(f, 0x4000+uint16(i), i*101)
		}
		stream = append(stream, f...)
		want = append(want, f)
	}
	for _, chunk := range []int{1, 3, 7, 1000, 1 << 20} {
		fr := frameReader{r: &chunkReader{b: stream, chunk: chunk}}
		for i, w := range want {
			f, err := fr.next()
			if err != nil || !bytes.Equal(f, w) {
				t.Fatalf("chunk %d, frame %d: got %d bytes (%v), want %d", chunk, i, len(f), err, len(w))
			}
		}
		if _, err := fr.next(); err != io.EOF {
			t.Fatalf("chunk %d: at the end got %v, want EOF", chunk, err)
		}
	}
	fr := frameReader{r: &chunkReader{b: stream[:len(stream)-3], chunk: 100}}
	var err error
	for err == nil {
		_, err = fr.next()
	}
	if err != io.ErrUnexpectedEOF {
		t.Fatalf("stream cut inside a frame: %v, want ErrUnexpectedEOF", err)
	}
}

func TestDataIndicationDecodes(t *testing.T) {
	for _, peer := range []string{"198.51.100.9:3478", "[2001:db8::7]:65535"} {
		k := keyOf(netip.MustParseAddrPort(peer))
		payload := []byte("seven b")
		b := make([]byte, 64+len(payload)+3)
		copy(b[64:], payload)
		txid := [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
		start := putDataIndication(b, 64, len(payload), k, &txid)
		checkDataIndication(t, b[start:64+pad4(len(payload))], k, payload)
	}
}

func checkDataIndication(t *testing.T, msg []byte, peer addrKey, payload []byte) {
	t.Helper()
	m := &stun.Message{Raw: msg}
	if err := m.Decode(); err != nil {
		t.Fatal(err)
	}
	if m.Type != stun.NewType(stun.MethodData, stun.ClassIndication) {
		t.Fatalf("type %v", m.Type)
	}
	var a stun.XORMappedAddress
	if err := a.GetFromAs(m, stun.AttrXORPeerAddress); err != nil {
		t.Fatal(err)
	}
	ip, _ := netip.AddrFromSlice(a.IP)
	if got := netip.AddrPortFrom(ip.Unmap(), uint16(a.Port)); got != peer.addrPort() {
		t.Fatalf("peer %v, want %v", got, peer.addrPort())
	}
	data, err := m.Get(stun.AttrData)
	if err != nil || !bytes.Equal(data, payload) {
		t.Fatalf("data %q (%v), want %q", data, err, payload)
	}
}

func FuzzParseChannelData(f *testing.F) {
	f.Add([]byte{0x40, 0x00, 0x00, 0x02, 'h', 'i'})
	f.Fuzz(func(t *testing.T, b []byte) {
		ch, payload, err := parseChannelData(b)
		if err != nil {
			return
		}
		if ch < minChannel || ch > maxChannel || 4+len(payload) > len(b) || int(binary.BigEndian.Uint16(b[2:])) != len(payload) {
			t.Fatalf("accepted %x as channel %#x with %d bytes", b, ch, len(payload))
		}
		var h [4]byte
		putChannelHeader(h[:], ch, len(payload))
		if !bytes.Equal(h[:], b[:4]) {
			t.Fatalf("header %x does not round-trip (%x)", b[:4], h)
		}
	})
}

// FuzzFrameReader splits arbitrary streams, in arbitrary chunks: the frames it returns
// must tile the stream from the start, each as long as its header says.
func FuzzFrameReader(f *testing.F) {
	f.Add(stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw, uint8(3))
	f.Fuzz(func(t *testing.T, stream []byte, chunk uint8) {
		fr := frameReader{r: &chunkReader{b: stream, chunk: int(chunk) + 1}}
		off := 0
		for {
			fb, err := fr.next()
			if err != nil {
				if off == len(stream) && err != io.EOF {
					t.Fatalf("whole stream consumed, then %v", err)
				}
				return
			}
			n, lerr := frameLen(fb)
			if lerr != nil || n != len(fb) || !bytes.Equal(fb, stream[off:off+len(fb)]) {
				t.Fatalf("frame at %d: %d bytes, frameLen %d %v", off, len(fb), n, lerr)
			}
			off += len(fb)
		}
	})
}

// FuzzSendIndication checks the hand-written Send indication parser against pion/stun's
// decoder: whatever it accepts, pion must read the same way.
func FuzzSendIndication(f *testing.F) {
	m := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodSend, stun.ClassIndication))
	peer := stun.XORMappedAddress{IP: net.IPv4(198, 51, 100, 1), Port: 4000}
	if err := peer.AddToAs(m, stun.AttrXORPeerAddress); err != nil {
		f.Fatal(err)
	}
	m.Add(stun.AttrData, []byte("data"))
	f.Add(m.Raw)
	f.Fuzz(func(t *testing.T, b []byte) {
		peer, data, ok := parseSendIndication(b)
		if !ok {
			return
		}
		m := &stun.Message{Raw: b}
		if err := m.Decode(); err != nil {
			t.Fatalf("accepted what pion cannot decode: %v", err)
		}
		if m.Type != stun.NewType(stun.MethodSend, stun.ClassIndication) {
			t.Fatalf("accepted type %v", m.Type)
		}
		v, err := m.Get(stun.AttrData)
		if err != nil || !bytes.Equal(v, data) {
			t.Fatalf("data %x, pion says %x (%v)", data, v, err)
		}
		var a stun.XORMappedAddress
		if err := a.GetFromAs(m, stun.AttrXORPeerAddress); err != nil {
			// The one allowed difference: RFC 8489 says to ignore the reserved byte
			// before the family, which pion reads as part of it.
			if v, _ := m.Get(stun.AttrXORPeerAddress); len(v) > 0 && v[0] != 0 {
				return
			}
			t.Fatalf("pion: %v", err)
		}
		ip, _ := netip.AddrFromSlice(a.IP)
		if got := keyOf(netip.AddrPortFrom(ip, uint16(a.Port))); got != peer {
			t.Fatalf("peer %v, pion says %v", peer.addrPort(), got.addrPort())
		}
	})
}

// FuzzDataIndication builds Data indications for arbitrary peers and payloads; pion
// must decode each to the same peer and payload.
func FuzzDataIndication(f *testing.F) {
	f.Add([]byte("payload"), []byte{198, 51, 100, 1}, uint16(3478), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})
	f.Fuzz(func(t *testing.T, payload, ip []byte, port uint16, txid []byte) {
		addr, ok := netip.AddrFromSlice(ip)
		if !ok || len(payload) > maxPayload || len(txid) != 12 {
			return
		}
		k := keyOf(netip.AddrPortFrom(addr.Unmap(), port))
		b := make([]byte, dataIndicationHeader+len(payload)+3)
		copy(b[dataIndicationHeader:], payload)
		for i := dataIndicationHeader + len(payload); i < len(b); i++ {
			b[i] = 0xEE // stale bytes the padding must not leak
		}
		start := putDataIndication(b, dataIndicationHeader, len(payload), k, (*[12]byte)(txid))
		msg := b[start : dataIndicationHeader+pad4(len(payload))]
		if bytes.Contains(msg[len(msg)-(pad4(len(payload))-len(payload)):], []byte{0xEE}) {
			t.Fatal("padding leaks stale bytes")
		}
		checkDataIndication(t, msg, k, payload)
	})
}

func FuzzXORAddr(f *testing.F) {
	f.Add([]byte{0, 1, 0x21, 0x12, 1, 2, 3, 4}, []byte("abcdefghijkl"))
	f.Fuzz(func(t *testing.T, v, txid []byte) {
		k, ok := xorAddr(v, txid)
		if !ok {
			return
		}
		var out [20]byte
		n := putXORAddr(out[:], k, txid)
		// Re-encoding yields the input, except for the reserved first byte.
		if n != len(v) || !bytes.Equal(out[1:n], v[1:]) {
			t.Fatalf("%x decodes to %v, re-encodes to %x", v, k.addrPort(), out[:n])
		}
	})
}
