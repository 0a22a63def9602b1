package punch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/netip"
	"testing"

	pion "github.com/pion/stun/v3"

	"peerlink/nat"
	"peerlink/stun"
)

var (
	testKey     = []byte("0123456789abcdef")
	testSession = "5e55104"
	testAddr    = netip.MustParseAddrPort("198.51.100.7:40001")
)

func mustDecode(t *testing.T, b []byte) *pion.Message {
	t.Helper()
	m, err := decode(b)
	if err != nil {
		t.Fatalf("decode: %v", err)
	}
	return m
}

func TestCheckRoundTrip(t *testing.T) {
	id := stun.NewTransactionID()
	for _, tt := range []struct {
		name     string
		nominate bool
		seen     netip.AddrPort
	}{
		{"check", false, netip.AddrPort{}},
		{"nomination", true, testAddr},
		{"nomination v6", true, netip.MustParseAddrPort("[2001:db8::7]:9")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := buildCheck(id, testSession, nat.SideB, testKey, tt.nominate, tt.seen)
			if !stun.IsMessage(b) {
				t.Fatal("not framed as STUN")
			}
			m := mustDecode(t, b)
			s, side, ok := checkSession(m)
			if !ok || s != testSession || side != nat.SideB {
				t.Fatalf("checkSession = %q, %v, %v", s, side, ok)
			}
			c, err := parseCheck(m, testSession, nat.SideB, testKey)
			if err != nil {
				t.Fatal(err)
			}
			if c.id != id || c.nominate != tt.nominate || c.seen != tt.seen {
				t.Errorf("parsed %+v, want id %x nominate %v seen %v", c, id, tt.nominate, tt.seen)
			}
		})
	}
}

func TestResponseRoundTrip(t *testing.T) {
	id := stun.NewTransactionID()
	b := buildResponse(id, testAddr, testKey)
	got, err := parseResponse(b, testKey)
	if err != nil || got != testAddr {
		t.Fatalf("parseResponse = %v, %v; want %v", got, err, testAddr)
	}
	// The engine's responses are ordinary Binding responses to a STUN client too.
	r, err := stun.ParseBindingResponse(b)
	if err != nil || r.Mapped != testAddr || r.TransactionID != stun.TransactionID(id) {
		t.Errorf("stun.ParseBindingResponse = %+v, %v", r, err)
	}
}

// fixFingerprint recomputes the FINGERPRINT of a message whose bytes a test changed, so
// only MESSAGE-INTEGRITY can catch the change.
func fixFingerprint(b []byte) []byte {
	b = bytes.Clone(b)
	n := len(b) - 8
	binary.BigEndian.PutUint32(b[n+4:], crc32.ChecksumIEEE(b[:n])^0x5354554e)
	return b
}

func TestCheckRejected(t *testing.T) {
	id := stun.NewTransactionID()
	good := buildCheck(id, testSession, nat.SideA, testKey, false, netip.AddrPort{})
	flipped := bytes.Clone(good)
	flipped[10] ^= 1 // in the transaction ID
	// USE-CANDIDATE appended after MESSAGE-INTEGRITY is not covered by it.
	m := mustDecode(t, good)
	m.Attributes = m.Attributes[:len(m.Attributes)-1] // drop FINGERPRINT
	m.Raw = m.Raw[:len(m.Raw)-8]
	m.Length -= 8
	m.WriteLength()
	m.Add(pion.AttrUseCandidate, nil)
	if err := pion.Fingerprint.AddTo(m); err != nil {
		t.Fatal(err)
	}
	smuggled := m.Raw

	tests := []struct {
		name    string
		msg     []byte
		session string
		from    nat.Side
		key     []byte
		want    error
	}{
		{"wrong key", good, testSession, nat.SideA, []byte("fedcba9876543210"), errIntegrity},
		{"own side", good, testSession, nat.SideB, testKey, errWrongSender},
		{"other session", good, "other", nat.SideA, testKey, errNotCheck},
		{"tampered", fixFingerprint(flipped), testSession, nat.SideA, testKey, errIntegrity},
		{"attribute after integrity", smuggled, testSession, nat.SideA, testKey, errIntegrity},
		{"response", buildResponse(id, testAddr, testKey), testSession, nat.SideA, testKey, errNotCheck},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dm, err := decode(tt.msg)
			if err != nil {
				if !errors.Is(tt.want, errNotCheck) {
					t.Fatalf("decode: %v", err)
				}
				return
			}
			if _, err := parseCheck(dm, tt.session, tt.from, tt.key); err == nil {
				t.Fatal("accepted")
			} else if tt.want != errNotCheck && !errors.Is(err, tt.want) {
				t.Errorf("error %v, want %v", err, tt.want)
			}
		})
	}
	if _, err := parseResponse(buildResponse(id, testAddr, testKey), []byte("fedcba9876543210")); !errors.Is(err, errIntegrity) {
		t.Errorf("response with the wrong key: %v", err)
	}
	if _, err := parseResponse(good, testKey); err == nil {
		t.Error("a request parsed as a response")
	}
}

func TestSplitUsername(t *testing.T) {
	for _, tt := range []struct {
		in   string
		s    string
		side nat.Side
		ok   bool
	}{
		{"abc:a", "abc", nat.SideA, true},
		{"a:b:b", "a:b", nat.SideB, true},
		{"abc", "", 0, false},
		{":a", "", 0, false},
		{"abc:c", "", 0, false},
		{"abc:", "", 0, false},
	} {
		s, side, ok := splitUsername(tt.in)
		if s != tt.s || side != tt.side || ok != tt.ok {
			t.Errorf("splitUsername(%q) = %q, %v, %v", tt.in, s, side, ok)
		}
	}
}

// FuzzParseCheck feeds arbitrary datagrams to what the engine does with one that
// arrives: it must never panic, and whatever it accepts must be authentic.
func FuzzParseCheck(f *testing.F) {
	id := stun.TransactionID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	f.Add(buildCheck(id, testSession, nat.SideA, testKey, false, netip.AddrPort{}))
	f.Add(buildCheck(id, testSession, nat.SideA, testKey, true, testAddr))
	f.Add(buildResponse(id, testAddr, testKey))
	f.Add(stun.AppendBindingRequest(nil, id, stun.RequestOptions{}))
	f.Add([]byte("not stun"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if m, err := decode(b); err == nil {
			if c, err := parseCheck(m, testSession, nat.SideA, testKey); err == nil {
				if !authentic(m, testKey) || !bytes.Equal(c.id[:], b[8:20]) {
					t.Fatalf("accepted a check that does not verify: %x", b)
				}
			}
		}
		if a, err := parseResponse(b, testKey); err == nil && !a.IsValid() {
			t.Fatalf("accepted a response without an address: %x", b)
		}
	})
}
