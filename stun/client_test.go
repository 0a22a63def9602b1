package stun

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"slices"
	"testing"
)

// response builds a response message with msgBuilder.
func response(typ uint16) *msgBuilder {
	m := request()
	m.typ = typ
	return m
}

func addrValue(a netip.AddrPort) []byte {
	v := []byte{0, 1}
	if a.Addr().Is6() {
		v[1] = 2
	}
	v = be.AppendUint16(v, a.Port())
	return append(v, a.Addr().AsSlice()...)
}

func TestParseBindingResponse(t *testing.T) {
	mapped := netip.MustParseAddrPort("198.51.100.7:4242")
	other := netip.MustParseAddrPort("192.0.2.2:3479")
	origin := netip.MustParseAddrPort("192.0.2.1:3478")
	tests := []struct {
		name    string
		msg     []byte
		want    BindingResponse
		wantErr error
		code    int
	}{
		{
			name: "MAPPED-ADDRESS only, RFC 3489 names for the others",
			msg: response(typeBindingSuccess).attr(attrMappedAddress, addrValue(mapped)).
				attr(attrChangedAddress, addrValue(other)).attr(attrSourceAddress, addrValue(origin)).bytes(),
			want: BindingResponse{Mapped: mapped, PlainMapped: mapped, Other: other, Origin: origin},
		},
		{
			name: "RFC 5780 names win over RFC 3489 names in any order",
			msg: response(typeBindingSuccess).attr(attrMappedAddress, addrValue(mapped)).
				attr(attrChangedAddress, addrValue(mapped)).attr(attrOtherAddress, addrValue(other)).
				attr(attrResponseOrigin, addrValue(origin)).attr(attrSourceAddress, addrValue(mapped)).fpOn().bytes(),
			want: BindingResponse{Mapped: mapped, PlainMapped: mapped, Other: other, Origin: origin},
		},
		{
			name: "first of duplicated attributes",
			msg: response(typeBindingSuccess).attr(attrMappedAddress, addrValue(mapped)).
				attr(attrMappedAddress, addrValue(other)).attr(attrSoftware, []byte("one")).attr(attrSoftware, []byte("two")).bytes(),
			want: BindingResponse{Mapped: mapped, PlainMapped: mapped, Software: "one"},
		},
		{
			name: "attributes after MESSAGE-INTEGRITY are ignored",
			msg: response(typeBindingSuccess).attr(attrMappedAddress, addrValue(mapped)).
				attr(attrMessageIntegrity, make([]byte, 20)).attr(attrOtherAddress, addrValue(other)).bytes(),
			want: BindingResponse{Mapped: mapped, PlainMapped: mapped},
		},
		{
			name: "error response",
			msg: response(typeBindingError).attr(attrErrorCode, []byte{0, 0, 4, 20, 'n', 'o'}).
				attr(attrUnknownAttributes, []byte{0, 3, 0x77, 0x77}).fpOn().bytes(),
			wantErr: &ResponseError{},
			code:    420,
		},
		{"not STUN", []byte("hello, world, this is not stun"), BindingResponse{}, ErrNotSTUN, 0},
		{"RFC 3489 response", response(typeBindingSuccess).classicOn().attr(attrMappedAddress, addrValue(mapped)).bytes(), BindingResponse{}, ErrNotSTUN, 0},
		{"bad FINGERPRINT", (&msgBuilder{typ: typeBindingSuccess, badFP: true}).bytes(), BindingResponse{}, ErrNotSTUN, 0},
		{"request", request().bytes(), BindingResponse{}, ErrUnexpectedMessage, 0},
		{"no mapped address", response(typeBindingSuccess).bytes(), BindingResponse{}, ErrMalformed, 0},
		{"short address", response(typeBindingSuccess).attr(attrXORMappedAddress, []byte{0, 1, 0, 0, 1}).bytes(), BindingResponse{}, ErrMalformed, 0},
		{"IPv6 family with IPv4 length", response(typeBindingSuccess).attr(attrMappedAddress, []byte{0, 2, 0, 1, 1, 2, 3, 4}).bytes(), BindingResponse{}, ErrMalformed, 0},
		{"unknown family", response(typeBindingSuccess).attr(attrMappedAddress, []byte{0, 3, 0, 1, 1, 2, 3, 4}).bytes(), BindingResponse{}, ErrMalformed, 0},
		{"error without ERROR-CODE", response(typeBindingError).bytes(), BindingResponse{}, ErrMalformed, 0},
		{"error code class 7", response(typeBindingError).attr(attrErrorCode, []byte{0, 0, 7, 0}).bytes(), BindingResponse{}, ErrMalformed, 0},
		{"odd UNKNOWN-ATTRIBUTES", response(typeBindingError).attr(attrErrorCode, []byte{0, 0, 4, 20}).attr(attrUnknownAttributes, []byte{0, 3, 0}).bytes(), BindingResponse{}, ErrMalformed, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseBindingResponse(tt.msg)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				tt.want.TransactionID = got.TransactionID
				if got != tt.want {
					t.Errorf("got %+v, want %+v", got, tt.want)
				}
				return
			}
			var re *ResponseError
			if tt.code != 0 {
				if !errors.As(err, &re) || re.Code != tt.code || re.Reason != "no" || !slices.Equal(re.Unknown, []uint16{3, 0x7777}) {
					t.Fatalf("err %v, want error response %d", err, tt.code)
				}
				if got.TransactionID != (TransactionID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}) {
					t.Errorf("transaction ID %x lost in error response", got.TransactionID)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("err %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestReadMessage(t *testing.T) {
	a := request().attr(attrSoftware, []byte("first")).bytes()
	b := request().change(ChangeIP).fpOn().bytes()
	stream := append(slices.Clone(a), b...)
	buf := make([]byte, 64)

	r := bytes.NewReader(stream)
	for i, want := range [][]byte{a, b} {
		got, err := ReadMessage(r, buf)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("message %d: % x, %v", i, got, err)
		}
	}
	if _, err := ReadMessage(r, buf); err != io.EOF {
		t.Errorf("at end: %v, want EOF", err)
	}
	// Byte by byte is the same stream.
	r1 := io.MultiReader(bytesOneByOne(stream)...)
	for i, want := range [][]byte{a, b} {
		if got, err := ReadMessage(r1, buf); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("byte by byte, message %d: % x, %v", i, got, err)
		}
	}

	for name, tc := range map[string]struct {
		in      []byte
		bufSize int
		want    error
	}{
		"not STUN":          {[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 64, ErrNotSTUN},
		"odd length":        {append([]byte{0, 1, 0, 3}, make([]byte, 20)...), 64, ErrNotSTUN},
		"larger than buf":   {b, 30, ErrNotSTUN},
		"truncated body":    {b[:30], 64, io.ErrUnexpectedEOF},
		"truncated header":  {b[:10], 64, io.ErrUnexpectedEOF},
		"buffer too small":  {b, 10, io.ErrShortBuffer},
		"empty stream":      {nil, 64, io.EOF},
		"maximum length ok": {append([]byte{0, 1, 0xff, 0xfc}, make([]byte, 20+0xfffc)...), 20 + 0xfffc, nil},
	} {
		_, err := ReadMessage(bytes.NewReader(tc.in), make([]byte, tc.bufSize))
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
}

func bytesOneByOne(b []byte) []io.Reader {
	rs := make([]io.Reader, len(b))
	for i := range b {
		rs[i] = bytes.NewReader(b[i : i+1])
	}
	return rs
}

func TestChangeRequestString(t *testing.T) {
	for c, want := range map[ChangeRequest]string{0: "none", ChangePort: "port", ChangeIP: "ip", ChangeIP | ChangePort: "ip+port"} {
		if c.String() != want {
			t.Errorf("%d: %q, want %q", c, c.String(), want)
		}
	}
}
