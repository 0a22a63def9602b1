package stun

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"testing"

	pion "github.com/pion/stun/v3"
)

// FuzzServerHandle feeds raw datagrams to the server's handler from any source on any of
// its four sockets. Whatever the input: no panic, no allocation, silence only where the
// RFC or the abuse rules call for it, and every answer a well-formed response to the
// request's transaction.
func FuzzServerHandle(f *testing.F) {
	f.Fuzz(func(t *testing.T, msg []byte, port uint16, on uint8, tcp, v6 bool) {
		w := newTestWorker(handlerOpts{software: "fuzz"})
		src := netip.AddrPortFrom(testClient.Addr(), port)
		if v6 {
			src = netip.AddrPortFrom(netip.MustParseAddr("2001:db8::7"), port)
		}
		sock := int(on % 4)
		resp := newResponse()
		var (
			from int
			ok   bool
		)
		if allocs := testing.AllocsPerRun(1, func() { from, _, ok = w.handle(msg, src, sock, tcp, 0, resp) }); allocs != 0 {
			t.Fatalf("%v allocations", allocs)
		}
		hdr, framed := parseHeader(msg)
		isRequest := framed && hdr.typ == typeBindingRequest
		classic := framed && hdr.cookie != magicCookie
		if !ok {
			if isRequest && port != 0 && !classic && !hasAttr(msg, attrFingerprint) {
				t.Fatalf("silence for a Binding request without FINGERPRINT from %v", src)
			}
			if isRequest && port != 0 && classic {
				t.Fatalf("silence for an RFC 3489 Binding request from %v", src)
			}
			return
		}
		if !isRequest {
			t.Fatalf("answered something that is not a Binding request")
		}
		if from < 0 || from > 3 || (tcp && from != sock) {
			t.Fatalf("answer from socket %d for a request on %d (tcp %v)", from, sock, tcp)
		}
		if len(resp.Raw) > responseCap {
			t.Fatalf("%d-byte answer", len(resp.Raw))
		}
		if !bytes.Equal(resp.Raw[4:20], msg[4:20]) {
			t.Fatalf("answer to another transaction")
		}
		r, err := parseBindingResponse(resp.Raw, classic)
		var re *ResponseError
		switch {
		case errors.As(err, &re):
			if re.Code != 400 && re.Code != 420 {
				t.Fatalf("error %d", re.Code)
			}
		case err != nil:
			t.Fatalf("answer does not parse: %v", err)
		case r.Mapped != src:
			t.Fatalf("mapped %v, want %v", r.Mapped, src)
		}
	})
}

func hasAttr(msg []byte, typ uint16) bool {
	it := newAttrIter(msg)
	for {
		ty, _, _, ok := it.next()
		if !ok {
			return false
		}
		if ty == typ {
			return true
		}
	}
}

// FuzzParseBindingResponse checks the client-side parser: no panic, a success always has
// a mapped address, and where an independent decoder also reads the XOR-MAPPED-ADDRESS
// the two agree.
func FuzzParseBindingResponse(f *testing.F) {
	f.Fuzz(func(t *testing.T, msg []byte) {
		r, err := ParseBindingResponse(msg)
		if err != nil {
			var re *ResponseError
			if errors.As(err, &re) && (re.Code < 300 || re.Code > 699) {
				t.Fatalf("error code %d", re.Code)
			}
			return
		}
		if !r.Mapped.IsValid() {
			t.Fatal("success without a mapped address")
		}
		if !r.MappedXOR || hasAttr(msg, attrMessageIntegrity) {
			return
		}
		m := new(pion.Message)
		if pion.Decode(msg, m) != nil {
			return
		}
		var xa pion.XORMappedAddress
		if xa.GetFrom(m) != nil {
			return
		}
		ip, _ := netip.AddrFromSlice(xa.IP)
		if want := netip.AddrPortFrom(ip, uint16(xa.Port)); want != r.Mapped {
			t.Fatalf("mapped %v, pion reads %v", r.Mapped, want)
		}
	})
}

// FuzzReadMessage reads a TCP byte stream message by message: no panic, every message is
// framed as its header says, and nothing is read beyond the stream.
func FuzzReadMessage(f *testing.F) {
	f.Fuzz(func(t *testing.T, stream []byte) {
		r := bytes.NewReader(stream)
		buf := make([]byte, maxMessageSize)
		total := 0
		for {
			msg, err := ReadMessage(r, buf)
			if err != nil {
				if err != io.EOF && err != io.ErrUnexpectedEOF && !errors.Is(err, ErrNotSTUN) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			total += len(msg)
			if len(msg) < headerSize || len(msg)%4 != 0 || int(be.Uint16(msg[2:4]))+headerSize != len(msg) {
				t.Fatalf("badly framed % x", msg)
			}
			if !bytes.Equal(msg, stream[total-len(msg):total]) {
				t.Fatal("message is not the stream's bytes")
			}
		}
	})
}
