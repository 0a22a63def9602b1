// Package probe is a small STUN-like prober, independent of peerlink's STUN code, that
// the NAT labs use as ground truth for how a NAT maps, filters and allocates ports.
package probe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// Wire format (big endian), one message per datagram:
//
//	0   4  magic "PLNP"
//	4   1  version (1)
//	5   1  kind: 1 request, 2 response
//	6   1  flags: bit 0 change IP, bit 1 change port
//	7   1  reserved, zero
//	8  12  transaction ID
//	20     response only: observed source, then answering socket, each as
//	       family (4 or 6), port (2), address (4 or 16)
//
// Requests are padded to RequestLen so that an answer is never larger than the request
// that caused it: a probe server cannot be used to amplify traffic.
const (
	magic      = "PLNP"
	version    = 1
	headerLen  = 20
	kindReq    = 1
	kindResp   = 2
	flagIP     = 1 << 0
	flagPort   = 1 << 1
	knownFlags = flagIP | flagPort

	// RequestLen is the size of every request on the wire.
	RequestLen = 64
	// maxResponseLen is the largest response: two IPv6 endpoints.
	maxResponseLen = headerLen + 2*(1+2+16)
)

// ErrMalformed is wrapped by Parse errors.
var ErrMalformed = errors.New("probe: malformed message")

// Message is a probe request or response.
type Message struct {
	// Response is false for a request.
	Response bool
	// ChangeIP and ChangePort ask the server to answer from its other IP and/or port.
	// A response echoes the flags of its request.
	ChangeIP, ChangePort bool
	TxID                 [12]byte
	// Observed is the source address the server saw the request come from (response only).
	Observed netip.AddrPort
	// Origin is the server address the response was sent from (response only).
	Origin netip.AddrPort
}

// Append appends the wire form of m to b.
func (m Message) Append(b []byte) []byte {
	start := len(b)
	b = append(b, magic...)
	b = append(b, version)
	kind := byte(kindReq)
	if m.Response {
		kind = kindResp
	}
	var flags byte
	if m.ChangeIP {
		flags |= flagIP
	}
	if m.ChangePort {
		flags |= flagPort
	}
	b = append(b, kind, flags, 0)
	b = append(b, m.TxID[:]...)
	if !m.Response {
		for len(b)-start < RequestLen {
			b = append(b, 0)
		}
		return b
	}
	b = appendAddr(b, m.Observed)
	return appendAddr(b, m.Origin)
}

func appendAddr(b []byte, ap netip.AddrPort) []byte {
	a := ap.Addr().Unmap()
	if a.Is4() {
		b = append(b, 4)
	} else {
		b = append(b, 6)
	}
	b = binary.BigEndian.AppendUint16(b, ap.Port())
	return append(b, a.AsSlice()...)
}

// Parse decodes one datagram. It never panics on any input.
func Parse(b []byte) (Message, error) {
	var m Message
	if len(b) < headerLen {
		return m, fmt.Errorf("%w: %d bytes, want at least %d", ErrMalformed, len(b), headerLen)
	}
	if string(b[:4]) != magic {
		return m, fmt.Errorf("%w: bad magic", ErrMalformed)
	}
	if b[4] != version {
		return m, fmt.Errorf("%w: version %d", ErrMalformed, b[4])
	}
	if b[6]&^knownFlags != 0 || b[7] != 0 {
		return m, fmt.Errorf("%w: unknown flags %#x/%#x", ErrMalformed, b[6], b[7])
	}
	m.ChangeIP = b[6]&flagIP != 0
	m.ChangePort = b[6]&flagPort != 0
	copy(m.TxID[:], b[8:20])
	switch b[5] {
	case kindReq:
		if len(b) < RequestLen {
			return m, fmt.Errorf("%w: request of %d bytes, want %d", ErrMalformed, len(b), RequestLen)
		}
		return m, nil
	case kindResp:
		m.Response = true
	default:
		return m, fmt.Errorf("%w: kind %d", ErrMalformed, b[5])
	}
	rest := b[headerLen:]
	var err error
	if m.Observed, rest, err = parseAddr(rest); err != nil {
		return m, err
	}
	if m.Origin, rest, err = parseAddr(rest); err != nil {
		return m, err
	}
	if len(rest) != 0 {
		return m, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(rest))
	}
	return m, nil
}

func parseAddr(b []byte) (netip.AddrPort, []byte, error) {
	if len(b) < 3 {
		return netip.AddrPort{}, nil, fmt.Errorf("%w: truncated address", ErrMalformed)
	}
	n := 0
	switch b[0] {
	case 4:
		n = 4
	case 6:
		n = 16
	default:
		return netip.AddrPort{}, nil, fmt.Errorf("%w: address family %d", ErrMalformed, b[0])
	}
	port := binary.BigEndian.Uint16(b[1:3])
	if len(b) < 3+n {
		return netip.AddrPort{}, nil, fmt.Errorf("%w: truncated address", ErrMalformed)
	}
	a, _ := netip.AddrFromSlice(b[3 : 3+n])
	return netip.AddrPortFrom(a, port), b[3+n:], nil
}
