package relay

import (
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
)

// The hand-written parts of TURN's wire format: what runs per relayed packet (ChannelData,
// Send and Data indications) and the TCP stream framing. Control requests are decoded
// with pion/stun; this file stays free of allocations.

const (
	stunHeaderSize = 20
	magicCookie    = 0x2112A442

	// Channel numbers: RFC 8656 assigns 0x4000-0x4FFF; clients written to RFC 5766
	// (coturn's among them) pick from 0x4000-0x7FFF, so the older range is accepted.
	minChannel = 0x4000
	maxChannel = 0x7FFF

	// maxPayload is the largest payload a ChannelData message can carry.
	maxPayload = 0xFFFF

	// STUN message types on the data path.
	typeSendIndication = 0x0016
	typeDataIndication = 0x0017

	attrXORPeerAddress = 0x0012
	attrData           = 0x0013
	attrDontFragment   = 0x001A
	attrFingerprint    = 0x8028

	familyIPv4 = 0x01
	familyIPv6 = 0x02
)

// Errors from the framing and data-path decoders.
var (
	ErrMalformed = errors.New("relay: malformed message")
	ErrTruncated = errors.New("relay: truncated message")
)

// addrKey is a transport address in a fixed-size comparable form, IPv4 as v4-mapped
// IPv6, so maps and comparisons on the data path do not allocate.
type addrKey struct {
	ip   [16]byte
	port uint16
}

func keyOf(ap netip.AddrPort) addrKey { return addrKey{ap.Addr().As16(), ap.Port()} }

func (k addrKey) addrPort() netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(k.ip).Unmap(), k.port)
}

func (k addrKey) is4() bool {
	return k.ip[10] == 0xff && k.ip[11] == 0xff && [10]byte(k.ip[:10]) == [10]byte{}
}

// isChannelData reports whether b starts like a ChannelData message: its first two bits
// are 01, where a STUN message has 00.
func isChannelData(b []byte) bool { return len(b) > 0 && b[0]&0xC0 == 0x40 }

// parseChannelData returns the channel number and payload of a ChannelData message. Bytes
// after the payload (padding) are ignored, as RFC 8656 requires; a payload longer than b
// is ErrTruncated.
func parseChannelData(b []byte) (ch uint16, payload []byte, err error) {
	if len(b) < 4 {
		return 0, nil, ErrTruncated
	}
	ch = binary.BigEndian.Uint16(b)
	if ch < minChannel || ch > maxChannel {
		return 0, nil, ErrMalformed
	}
	n := int(binary.BigEndian.Uint16(b[2:]))
	if 4+n > len(b) {
		return 0, nil, ErrTruncated
	}
	return ch, b[4 : 4+n], nil
}

// putChannelHeader writes a ChannelData header into b[0:4].
func putChannelHeader(b []byte, ch uint16, n int) {
	binary.BigEndian.PutUint16(b, ch)
	binary.BigEndian.PutUint16(b[2:], uint16(n))
}

// pad4 rounds n up to a multiple of 4.
func pad4(n int) int { return (n + 3) &^ 3 }

// frameLen returns the length of the TURN frame at the start of a TCP stream: a STUN
// message, or a ChannelData message with its padding to four bytes. It returns 0 when b
// is too short to tell, and ErrMalformed when the stream cannot be a TURN stream.
func frameLen(b []byte) (int, error) {
	if len(b) < 4 {
		return 0, nil
	}
	n := int(binary.BigEndian.Uint16(b[2:]))
	switch b[0] & 0xC0 {
	case 0x00:
		if n%4 != 0 {
			return 0, ErrMalformed
		}
		if len(b) >= 8 && binary.BigEndian.Uint32(b[4:]) != magicCookie {
			return 0, ErrMalformed
		}
		return stunHeaderSize + n, nil
	case 0x40:
		if ch := binary.BigEndian.Uint16(b); ch > maxChannel {
			return 0, ErrMalformed
		}
		return 4 + pad4(n), nil
	}
	return 0, ErrMalformed
}

// looksLikeSTUN is a cheap check, before a full decode, that b is one whole STUN message.
func looksLikeSTUN(b []byte) bool {
	if len(b) < stunHeaderSize || b[0]&0xC0 != 0 {
		return false
	}
	n := int(binary.BigEndian.Uint16(b[2:]))
	return n%4 == 0 && stunHeaderSize+n <= len(b) && binary.BigEndian.Uint32(b[4:]) == magicCookie
}

// xorAddr decodes an XOR-PEER-ADDRESS (or any XOR-*-ADDRESS) value; txid is the
// message's transaction ID, which IPv6 addresses are XORed with.
func xorAddr(v []byte, txid []byte) (addrKey, bool) {
	if len(v) < 4 {
		return addrKey{}, false
	}
	var k addrKey
	k.port = binary.BigEndian.Uint16(v[2:]) ^ (magicCookie >> 16)
	switch v[1] {
	case familyIPv4:
		if len(v) != 8 {
			return addrKey{}, false
		}
		k.ip[10], k.ip[11] = 0xff, 0xff
		binary.BigEndian.PutUint32(k.ip[12:], binary.BigEndian.Uint32(v[4:])^magicCookie)
	case familyIPv6:
		if len(v) != 20 || len(txid) != 12 {
			return addrKey{}, false
		}
		var x [16]byte
		binary.BigEndian.PutUint32(x[:], magicCookie)
		copy(x[4:], txid)
		for i := range 16 {
			k.ip[i] = v[4+i] ^ x[i]
		}
	default:
		return addrKey{}, false
	}
	return k, true
}

// putXORAddr encodes k as an XOR-*-ADDRESS value into b and returns its length (8 or
// 20); b must hold 20 bytes.
func putXORAddr(b []byte, k addrKey, txid []byte) int {
	b[0] = 0
	binary.BigEndian.PutUint16(b[2:], k.port^(magicCookie>>16))
	if k.is4() {
		b[1] = familyIPv4
		binary.BigEndian.PutUint32(b[4:], binary.BigEndian.Uint32(k.ip[12:])^magicCookie)
		return 8
	}
	b[1] = familyIPv6
	var x [16]byte
	binary.BigEndian.PutUint32(x[:], magicCookie)
	copy(x[4:], txid)
	for i := range 16 {
		b[4+i] = k.ip[i] ^ x[i]
	}
	return 20
}

// parseSendIndication returns the peer and payload of a Send indication, without
// allocating. ok is false for anything that is not a well-formed Send indication with
// both attributes, or that carries a comprehension-required attribute the relay does not
// know (RFC 8489 says to discard those).
func parseSendIndication(b []byte) (peer addrKey, data []byte, ok bool) {
	if !looksLikeSTUN(b) || binary.BigEndian.Uint16(b) != typeSendIndication {
		return addrKey{}, nil, false
	}
	txid := b[8:20]
	end := stunHeaderSize + int(binary.BigEndian.Uint16(b[2:]))
	havePeer, haveData := false, false
	for off := stunHeaderSize; off < end; {
		if off+4 > end {
			return addrKey{}, nil, false
		}
		t := binary.BigEndian.Uint16(b[off:])
		n := int(binary.BigEndian.Uint16(b[off+2:]))
		v := off + 4
		if v+n > end {
			return addrKey{}, nil, false
		}
		switch t {
		case attrXORPeerAddress:
			if !havePeer {
				peer, havePeer = xorAddr(b[v:v+n], txid)
				if !havePeer {
					return addrKey{}, nil, false
				}
			}
		case attrData:
			if !haveData {
				data, haveData = b[v:v+n], true
			}
		case attrDontFragment:
		default:
			if t < 0x8000 {
				return addrKey{}, nil, false
			}
		}
		off = v + pad4(n)
	}
	return peer, data, havePeer && haveData
}

// dataIndicationHeader is the most room a Data indication needs in front of its payload:
// the STUN header, an IPv6 XOR-PEER-ADDRESS and the DATA attribute header.
const dataIndicationHeader = stunHeaderSize + 4 + 20 + 4

// putDataIndication writes a Data indication around a payload that already sits at
// b[off:off+n], with off >= dataIndicationHeader and three spare bytes after the payload
// for padding. It returns the start of the message; the message is b[start:off+pad4(n)].
func putDataIndication(b []byte, off, n int, peer addrKey, txid *[12]byte) (start int) {
	addrLen := 8
	if !peer.is4() {
		addrLen = 20
	}
	start = off - (stunHeaderSize + 4 + addrLen + 4)
	h := b[start:]
	binary.BigEndian.PutUint16(h, typeDataIndication)
	binary.BigEndian.PutUint16(h[2:], uint16(4+addrLen+4+pad4(n)))
	binary.BigEndian.PutUint32(h[4:], magicCookie)
	copy(h[8:20], txid[:])
	binary.BigEndian.PutUint16(h[20:], attrXORPeerAddress)
	binary.BigEndian.PutUint16(h[22:], uint16(addrLen))
	putXORAddr(h[24:], peer, txid[:])
	a := 24 + addrLen
	binary.BigEndian.PutUint16(h[a:], attrData)
	binary.BigEndian.PutUint16(h[a+2:], uint16(n))
	// Zero the padding: the buffer is reused, and stale bytes there would leak another
	// packet's payload.
	for i := off + n; i < off+pad4(n); i++ {
		b[i] = 0
	}
	return start
}

func unmapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// frameReader splits a TURN TCP stream into frames. Its buffer grows to the largest
// frame seen, so an idle connection holds little memory.
type frameReader struct {
	r          io.Reader
	dataOK     func() bool // nil means ChannelData is always acceptable
	buf        []byte
	start, end int
}

// maxFrame is the largest frame: a STUN message of maximum length.
const maxFrame = stunHeaderSize + maxPayload

func (fr *frameReader) next() ([]byte, error) {
	for {
		b := fr.buf[fr.start:fr.end]
		n, err := frameLen(b)
		if err != nil {
			return nil, err
		}
		if n > 0 && isChannelData(b) && fr.dataOK != nil && !fr.dataOK() {
			return nil, ErrMalformed
		}
		if n > maxFrame {
			return nil, ErrMalformed
		}
		if n > 0 && len(b) >= n {
			fr.start += n
			return b[:n:n], nil
		}
		// Make room for the whole frame (or, before its length is known, its header):
		// move it to the front, growing the buffer if it is too small.
		need := max(n, 4)
		if fr.start+need > len(fr.buf) {
			if need > len(fr.buf) {
				grown := make([]byte, min(max(2048, 2*len(fr.buf), need), maxFrame))
				copy(grown, b)
				fr.buf = grown
			} else {
				copy(fr.buf, b)
			}
			fr.start, fr.end = 0, len(b)
		}
		m, err := fr.r.Read(fr.buf[fr.end:])
		fr.end += m
		if m > 0 {
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) && fr.end > fr.start {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}
