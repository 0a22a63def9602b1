// Package stun is peerlink's STUN server and the client helpers for Binding requests.
package stun

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
)

// Wire constants of RFC 8489 and the RFC 5780/RFC 3489 attributes peerlink uses.
const (
	headerSize  = 20
	magicCookie = 0x2112A442

	// maxMessageSize bounds every message the server reads, over UDP and TCP. Binding
	// requests are small; RFC 5780 PADDING brings them to one MTU at most.
	maxMessageSize = 2048

	typeBindingRequest = 0x0001
	typeBindingSuccess = 0x0101
	typeBindingError   = 0x0111

	fingerprintXOR = 0x5354554e
)

// Attribute types.
const (
	attrMappedAddress          = 0x0001
	attrResponseAddress        = 0x0002 // RFC 3489, not supported: answered with 420
	attrChangeRequest          = 0x0003
	attrSourceAddress          = 0x0004 // RFC 3489
	attrChangedAddress         = 0x0005 // RFC 3489
	attrUsername               = 0x0006
	attrMessageIntegrity       = 0x0008
	attrErrorCode              = 0x0009
	attrUnknownAttributes      = 0x000A
	attrRealm                  = 0x0014
	attrNonce                  = 0x0015
	attrMessageIntegritySHA256 = 0x001C
	attrPasswordAlgorithm      = 0x001D
	attrUserhash               = 0x001E
	attrXORMappedAddress       = 0x0020
	attrPriority               = 0x0024 // RFC 8445 ICE
	attrUseCandidate           = 0x0025 // RFC 8445 ICE
	attrPadding                = 0x0026
	attrResponsePort           = 0x0027 // RFC 5780: answer to the source IP at this port
	attrXORMappedAddressOld    = 0x8020 // pre-RFC 5389 drafts
	attrSoftware               = 0x8022
	attrFingerprint            = 0x8028
	attrResponseOrigin         = 0x802B
	attrOtherAddress           = 0x802C
)

// ChangeRequest holds the flags of a CHANGE-REQUEST attribute (RFC 5780 section 7.2): which
// of its addresses the server should answer from.
type ChangeRequest uint8

const (
	// ChangePort asks for the response from the server's other port.
	ChangePort ChangeRequest = 0x02
	// ChangeIP asks for the response from the server's other IP address.
	ChangeIP ChangeRequest = 0x04
)

// String returns "none", "port", "ip" or "ip+port".
func (c ChangeRequest) String() string {
	switch c & (ChangeIP | ChangePort) {
	case 0:
		return "none"
	case ChangePort:
		return "port"
	case ChangeIP:
		return "ip"
	default:
		return "ip+port"
	}
}

// socket is the index of one of a server's four UDP sockets: bit 0 set means the
// alternate port, bit 1 the alternate IP, so XOR with a CHANGE-REQUEST's flags>>1 gives the
// socket to answer from.
func (c ChangeRequest) socket() int { return int(c>>1) & 3 }

// Sentinel errors.
var (
	// ErrNotSTUN means the bytes are not a STUN message: bad header, length or
	// FINGERPRINT. The RFC's answer to such input is silence.
	ErrNotSTUN = errors.New("stun: not a STUN message")
	// ErrMalformed means a STUN message whose attributes cannot be read.
	ErrMalformed = errors.New("stun: malformed message")
	// ErrUnexpectedMessage means a valid STUN message that is not the kind expected,
	// for example a request where a Binding response was expected.
	ErrUnexpectedMessage = errors.New("stun: unexpected message type")
	// ErrServerClosed is returned by Serve after Close.
	ErrServerClosed = errors.New("stun: server closed")
	// ErrConfig wraps every configuration error of Listen.
	ErrConfig = errors.New("stun: bad config")
)

var be = binary.BigEndian

// header is the fixed part of a STUN message. For RFC 3489 messages the cookie field is
// the first word of their 128-bit transaction ID.
type header struct {
	typ    uint16
	length int
	cookie uint32
	txID   [12]byte
}

// parseHeader checks the RFC 8489 section 6.3 framing rules that do not depend on the
// cookie: at least a header, the two top bits zero, a length that is a multiple of four
// and matches the datagram.
func parseHeader(b []byte) (header, bool) {
	if len(b) < headerSize || b[0]&0xC0 != 0 {
		return header{}, false
	}
	h := header{
		typ:    be.Uint16(b[0:2]),
		length: int(be.Uint16(b[2:4])),
		cookie: be.Uint32(b[4:8]),
	}
	if h.length%4 != 0 || headerSize+h.length != len(b) {
		return header{}, false
	}
	copy(h.txID[:], b[8:20])
	return h, true
}

// attrIter walks the attributes of a message whose header passed parseHeader.
type attrIter struct {
	b   []byte // the whole message
	off int    // offset of the next attribute
	err bool   // an attribute overran the message
}

func newAttrIter(msg []byte) attrIter { return attrIter{b: msg, off: headerSize} }

// next returns the next attribute's type, value and offset in the message.
func (it *attrIter) next() (typ uint16, val []byte, off int, ok bool) {
	if it.err || it.off >= len(it.b) {
		return 0, nil, 0, false
	}
	rest := it.b[it.off:]
	if len(rest) < 4 {
		it.err = true
		return 0, nil, 0, false
	}
	typ = be.Uint16(rest[0:2])
	n := int(be.Uint16(rest[2:4]))
	padded := (n + 3) &^ 3
	if 4+padded > len(rest) {
		it.err = true
		return 0, nil, 0, false
	}
	off = it.off
	it.off += 4 + padded
	return typ, rest[4 : 4+n], off, true
}

// fingerprintOK reports whether the FINGERPRINT attribute at off, the message's last,
// holds the CRC-32 of the message before it.
func fingerprintOK(msg []byte, off int, val []byte) bool {
	if len(val) != 4 || off+8 != len(msg) {
		return false
	}
	return be.Uint32(val) == crc32.ChecksumIEEE(msg[:off])^fingerprintXOR
}
