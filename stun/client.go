package stun

import (
	"crypto/rand"
	"fmt"
	"io"
	"net/netip"

	pion "github.com/pion/stun/v3"
)

// TransactionID is the 96-bit transaction ID of an RFC 8489 message.
type TransactionID [12]byte

// NewTransactionID returns a random transaction ID.
func NewTransactionID() TransactionID {
	var id TransactionID
	rand.Read(id[:]) // never fails (crypto/rand panics instead)
	return id
}

// RequestOptions are the optional parts of a Binding request.
type RequestOptions struct {
	// Change adds a CHANGE-REQUEST attribute with these flags (RFC 5780). The zero value
	// adds none.
	Change ChangeRequest
	// Software is sent as the SOFTWARE attribute; empty sends none.
	Software string
	// ResponsePort adds a RESPONSE-PORT attribute (RFC 5780): the server answers to the
	// request's source IP at this port. Zero adds none.
	ResponsePort uint16
	// NoFingerprint leaves out the FINGERPRINT attribute, which is otherwise the last
	// attribute of the request.
	NoFingerprint bool
}

// AppendBindingRequest appends an RFC 8489 Binding request with transaction ID id to b and
// returns the extended slice.
func AppendBindingRequest(b []byte, id TransactionID, opts RequestOptions) []byte {
	m := pion.New()
	m.Type = pion.BindingRequest
	m.TransactionID = id
	m.WriteHeader()
	if c := opts.Change & (ChangeIP | ChangePort); c != 0 {
		m.Add(pion.AttrChangeRequest, []byte{0, 0, 0, byte(c)})
	}
	if opts.ResponsePort != 0 {
		m.Add(pion.AttrType(attrResponsePort), []byte{byte(opts.ResponsePort >> 8), byte(opts.ResponsePort), 0, 0})
	}
	if opts.Software != "" {
		pion.NewSoftware(opts.Software).AddTo(m)
	}
	if !opts.NoFingerprint {
		pion.Fingerprint.AddTo(m)
	}
	return append(b, m.Raw...)
}

// BindingResponse is what a client learns from a Binding response.
type BindingResponse struct {
	TransactionID TransactionID
	// Mapped is the client's address as the server saw it: XOR-MAPPED-ADDRESS, or
	// MAPPED-ADDRESS from servers that send only that.
	Mapped netip.AddrPort
	// MappedXOR reports that Mapped came from XOR-MAPPED-ADDRESS.
	MappedXOR bool
	// PlainMapped is MAPPED-ADDRESS when the response has one. A value different from an
	// XOR-MAPPED-ADDRESS is the mark of a NAT rewriting addresses inside payloads.
	PlainMapped netip.AddrPort
	// Other is OTHER-ADDRESS, or the older CHANGED-ADDRESS: the server's address on its
	// other IP and port (RFC 5780). It is the zero AddrPort when the server has none.
	Other netip.AddrPort
	// Origin is RESPONSE-ORIGIN, or the older SOURCE-ADDRESS: where the server sent the
	// response from. Zero when absent.
	Origin netip.AddrPort
	// Software is the server's SOFTWARE attribute.
	Software string
}

// ResponseError is a Binding error response (RFC 8489 section 14.8).
type ResponseError struct {
	Code   int
	Reason string
	// Unknown lists the UNKNOWN-ATTRIBUTES of a 420 response.
	Unknown []uint16
}

func (e *ResponseError) Error() string {
	if len(e.Unknown) > 0 {
		return fmt.Sprintf("stun: error response %d %s (unknown attributes %#04x)", e.Code, e.Reason, e.Unknown)
	}
	return fmt.Sprintf("stun: error response %d %s", e.Code, e.Reason)
}

// IsMessage reports whether b is framed as an RFC 8489 message: header, zero top bits,
// magic cookie and a length that matches len(b). It is the cheap test for telling STUN
// apart from other traffic on a shared socket; it does not check attributes.
func IsMessage(b []byte) bool {
	h, ok := parseHeader(b)
	return ok && h.cookie == magicCookie
}

// ParseBindingResponse reads a Binding success or error response datagram. For an error
// response it returns the transaction ID in the BindingResponse and a *ResponseError. It
// returns an error wrapping ErrNotSTUN for input that is not an RFC 8489 message (including
// a bad FINGERPRINT), ErrUnexpectedMessage for other STUN messages and ErrMalformed for
// unreadable attributes. Duplicated attributes count once, the first time.
func ParseBindingResponse(b []byte) (BindingResponse, error) {
	return parseBindingResponse(b, false)
}

// parseBindingResponse is ParseBindingResponse; classic also accepts RFC 3489 responses,
// whose cookie field is part of the transaction ID.
func parseBindingResponse(b []byte, classic bool) (BindingResponse, error) {
	var r BindingResponse
	h, ok := parseHeader(b)
	if !ok || (h.cookie != magicCookie && !classic) {
		return r, ErrNotSTUN
	}
	r.TransactionID = h.txID
	if h.typ != typeBindingSuccess && h.typ != typeBindingError {
		return r, ErrUnexpectedMessage
	}
	var (
		rerr                 *ResponseError
		haveXOR, haveMapped  bool
		haveOther, haveOrig  bool
		haveSoft, haveErr    bool
		haveUnknown, afterMI bool
	)
	if h.typ == typeBindingError {
		rerr = &ResponseError{}
	}
	it := newAttrIter(b)
	for {
		typ, val, off, ok := it.next()
		if !ok {
			break
		}
		if typ == attrFingerprint {
			if !fingerprintOK(b, off, val) {
				return r, fmt.Errorf("%w: bad FINGERPRINT", ErrNotSTUN)
			}
			continue
		}
		if afterMI && typ != attrMessageIntegritySHA256 {
			continue // RFC 8489 section 14.5: ignore what follows MESSAGE-INTEGRITY
		}
		switch typ {
		case attrMessageIntegrity:
			afterMI = true
		case attrXORMappedAddress, attrXORMappedAddressOld:
			if haveXOR {
				continue
			}
			a, ok := decodeXORAddr(val, h.cookie, h.txID)
			if !ok {
				return r, fmt.Errorf("%w: XOR-MAPPED-ADDRESS", ErrMalformed)
			}
			haveXOR, r.Mapped, r.MappedXOR = true, a, true
		case attrMappedAddress:
			if haveMapped {
				continue
			}
			a, ok := decodeAddr(val)
			if !ok {
				return r, fmt.Errorf("%w: MAPPED-ADDRESS", ErrMalformed)
			}
			haveMapped, r.PlainMapped = true, a
		case attrOtherAddress, attrChangedAddress:
			// OTHER-ADDRESS wins over CHANGED-ADDRESS whatever their order.
			if haveOther && typ == attrChangedAddress {
				continue
			}
			a, ok := decodeAddr(val)
			if !ok {
				return r, fmt.Errorf("%w: OTHER-ADDRESS", ErrMalformed)
			}
			haveOther = haveOther || typ == attrOtherAddress
			r.Other = a
		case attrResponseOrigin, attrSourceAddress:
			if haveOrig && typ == attrSourceAddress {
				continue
			}
			a, ok := decodeAddr(val)
			if !ok {
				return r, fmt.Errorf("%w: RESPONSE-ORIGIN", ErrMalformed)
			}
			haveOrig = haveOrig || typ == attrResponseOrigin
			r.Origin = a
		case attrSoftware:
			if !haveSoft {
				haveSoft, r.Software = true, string(val)
			}
		case attrErrorCode:
			if rerr == nil || haveErr {
				continue
			}
			if len(val) < 4 {
				return r, fmt.Errorf("%w: ERROR-CODE", ErrMalformed)
			}
			class, num := int(val[2]&0x07), int(val[3])
			if class < 3 || class > 6 || num > 99 {
				return r, fmt.Errorf("%w: ERROR-CODE", ErrMalformed)
			}
			haveErr = true
			rerr.Code, rerr.Reason = class*100+num, string(val[4:])
		case attrUnknownAttributes:
			if rerr == nil || haveUnknown {
				continue
			}
			if len(val)%2 != 0 {
				return r, fmt.Errorf("%w: UNKNOWN-ATTRIBUTES", ErrMalformed)
			}
			haveUnknown = true
			for i := 0; i < len(val); i += 2 {
				rerr.Unknown = append(rerr.Unknown, be.Uint16(val[i:]))
			}
		}
	}
	if it.err {
		return r, fmt.Errorf("%w: attribute overruns message", ErrMalformed)
	}
	if !haveXOR && haveMapped {
		r.Mapped = r.PlainMapped
	}
	if rerr != nil {
		if !haveErr {
			return r, fmt.Errorf("%w: error response without ERROR-CODE", ErrMalformed)
		}
		return r, rerr
	}
	if !r.Mapped.IsValid() {
		return r, fmt.Errorf("%w: no mapped address", ErrMalformed)
	}
	return r, nil
}

// decodeAddr reads a MAPPED-ADDRESS style value.
func decodeAddr(v []byte) (netip.AddrPort, bool) {
	if len(v) < 4 {
		return netip.AddrPort{}, false
	}
	port := be.Uint16(v[2:4])
	switch {
	case v[1] == 1 && len(v) == 8:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(v[4:8])), port), true
	case v[1] == 2 && len(v) == 20:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(v[4:20])), port), true
	}
	return netip.AddrPort{}, false
}

// decodeXORAddr reads an XOR-MAPPED-ADDRESS value of a message with cookie and txID.
func decodeXORAddr(v []byte, cookie uint32, txID [12]byte) (netip.AddrPort, bool) {
	a, ok := decodeAddr(v)
	if !ok {
		return a, false
	}
	port := a.Port() ^ uint16(cookie>>16)
	if a.Addr().Is4() {
		ip := a.Addr().As4()
		be.PutUint32(ip[:], be.Uint32(ip[:])^cookie)
		return netip.AddrPortFrom(netip.AddrFrom4(ip), port), true
	}
	ip := a.Addr().As16()
	var key [16]byte
	be.PutUint32(key[:4], cookie)
	copy(key[4:], txID[:])
	for i := range ip {
		ip[i] ^= key[i]
	}
	return netip.AddrPortFrom(netip.AddrFrom16(ip), port), true
}

// ReadMessage reads one STUN message from a stream (RFC 8489 section 6.2.2: messages
// follow each other on a TCP connection, each framed by its own length field) into buf
// and returns it. It returns an error wrapping ErrNotSTUN when the stream does not carry
// STUN or when the message does not fit in buf; the stream is then unusable.
func ReadMessage(r io.Reader, buf []byte) ([]byte, error) {
	if len(buf) < headerSize {
		return nil, io.ErrShortBuffer
	}
	if _, err := io.ReadFull(r, buf[:headerSize]); err != nil {
		return nil, err
	}
	n := int(be.Uint16(buf[2:4]))
	if buf[0]&0xC0 != 0 || n%4 != 0 {
		return nil, ErrNotSTUN
	}
	if headerSize+n > len(buf) {
		return nil, fmt.Errorf("%w: %d-byte message exceeds %d bytes", ErrNotSTUN, headerSize+n, len(buf))
	}
	if _, err := io.ReadFull(r, buf[headerSize:headerSize+n]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf[:headerSize+n], nil
}
