package stun

import (
	"bytes"
	"net/netip"
	"testing"

	pion "github.com/pion/stun/v3"
)

// The RFC 5769 test vectors, kept in testdata/rfc5769 as annotated hex.
const (
	vectorRequest     = "testdata/rfc5769/request.hex"
	vectorResponse4   = "testdata/rfc5769/response_ipv4.hex"
	vectorResponse6   = "testdata/rfc5769/response_ipv6.hex"
	vectorLongTermReq = "testdata/rfc5769/request_long_term.hex"
	vectorPassword    = "VOkJxbRl1RmTxUk/WvJxBt"
)

var vectorMapped = map[string]netip.AddrPort{
	vectorResponse4: netip.MustParseAddrPort("192.0.2.1:32853"),
	vectorResponse6: netip.MustParseAddrPort("[2001:db8:1234:5678:11:2233:4455:6677]:32853"),
}

// TestRFC5769Integrity checks the vectors themselves with an independent decoder, so a
// transcription error in testdata cannot pass unnoticed.
func TestRFC5769Integrity(t *testing.T) {
	for path, key := range map[string]pion.MessageIntegrity{
		vectorRequest:     pion.NewShortTermIntegrity(vectorPassword),
		vectorResponse4:   pion.NewShortTermIntegrity(vectorPassword),
		vectorResponse6:   pion.NewShortTermIntegrity(vectorPassword),
		vectorLongTermReq: pion.NewLongTermIntegrity("\u30DE\u30C8\u30EA\u30C3\u30AF\u30B9", "example.org", "TheMatrIX"),
	} {
		m := new(pion.Message)
		if err := pion.Decode(readHex(t, path), m); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if err := key.Check(m); err != nil {
			t.Errorf("%s: MESSAGE-INTEGRITY: %v", path, err)
		}
	}
}

// TestRFC5769Fingerprint checks peerlink's own FINGERPRINT check against the vectors, and
// that its attribute walk sees what the RFC lists.
func TestRFC5769Fingerprint(t *testing.T) {
	want := map[string][]uint16{
		vectorRequest:     {attrSoftware, attrPriority, 0x8029, attrUsername, attrMessageIntegrity, attrFingerprint},
		vectorResponse4:   {attrSoftware, attrXORMappedAddress, attrMessageIntegrity, attrFingerprint},
		vectorResponse6:   {attrSoftware, attrXORMappedAddress, attrMessageIntegrity, attrFingerprint},
		vectorLongTermReq: {attrUsername, attrNonce, attrRealm, attrMessageIntegrity},
	}
	for path, types := range want {
		msg := readHex(t, path)
		if _, ok := parseHeader(msg); !ok {
			t.Fatalf("%s: header rejected", path)
		}
		got := attrTypes(t, msg)
		if len(got) != len(types) {
			t.Fatalf("%s: attributes %#04x, want %#04x", path, got, types)
		}
		for i := range got {
			if got[i] != types[i] {
				t.Fatalf("%s: attributes %#04x, want %#04x", path, got, types)
			}
		}
		if types[len(types)-1] != attrFingerprint {
			continue
		}
		it := newAttrIter(msg)
		for {
			typ, val, off, ok := it.next()
			if !ok {
				break
			}
			if typ != attrFingerprint {
				continue
			}
			if !fingerprintOK(msg, off, val) {
				t.Errorf("%s: FINGERPRINT rejected", path)
			}
			msg[len(msg)-1] ^= 1
			if fingerprintOK(msg, off, val) {
				t.Errorf("%s: corrupted FINGERPRINT accepted", path)
			}
		}
	}
}

// TestRFC5769Responses parses the sample responses with the client helper.
func TestRFC5769Responses(t *testing.T) {
	for path, mapped := range vectorMapped {
		r, err := ParseBindingResponse(readHex(t, path))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if r.Mapped != mapped || !r.MappedXOR {
			t.Errorf("%s: mapped %v (xor %v), want %v", path, r.Mapped, r.MappedXOR, mapped)
		}
		if r.Software != "test vector" {
			t.Errorf("%s: software %q", path, r.Software)
		}
		if r.TransactionID != (TransactionID{0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae}) {
			t.Errorf("%s: transaction ID %x", path, r.TransactionID)
		}
	}
}

// TestRFC5769Requests answers the sample requests and checks that the answer's
// XOR-MAPPED-ADDRESS is byte for byte the one of the sample responses, which share the
// request's transaction ID.
func TestRFC5769Requests(t *testing.T) {
	req := readHex(t, vectorRequest)
	for path, client := range vectorMapped {
		w := newTestWorker(handlerOpts{single: true, software: "test vector"})
		got := handleOnce(w, req, client, 0, false)
		if !got.ok {
			t.Fatalf("sample request not answered for %v", client)
		}
		if _, err := ParseBindingResponse(got.resp); err != nil {
			t.Fatal(err)
		}
		if want, have := attrBytes(t, readHex(t, path), attrXORMappedAddress), attrBytes(t, got.resp, attrXORMappedAddress); !bytes.Equal(have, want) {
			t.Errorf("XOR-MAPPED-ADDRESS for %v: % x, want % x", client, have, want)
		}
		if want, have := attrBytes(t, readHex(t, path), attrSoftware), attrBytes(t, got.resp, attrSoftware); !bytes.Equal(have, want) {
			t.Errorf("SOFTWARE % x, want % x", have, want)
		}
	}
	// The long-term credential request: the server asks for no credentials, so it
	// answers.
	w := newTestWorker(handlerOpts{single: true})
	if got := handleOnce(w, readHex(t, vectorLongTermReq), testClient, 0, false); !got.ok || w.c.c[cResponses].Load() != 1 {
		t.Errorf("long-term credential request not answered with success")
	}
}

// attrBytes returns the type, length and value of the first attribute typ (not its
// padding, which the RFC's vectors fill with spaces and peerlink with zeros).
func attrBytes(t testing.TB, msg []byte, typ uint16) []byte {
	t.Helper()
	it := newAttrIter(msg)
	for {
		ty, val, off, ok := it.next()
		if !ok {
			t.Fatalf("no attribute %#04x", typ)
		}
		if ty == typ {
			return msg[off : off+4+len(val)]
		}
	}
}
