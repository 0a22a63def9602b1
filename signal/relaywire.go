package signal

import (
	"encoding/binary"
	"fmt"

	"peerlink/identity"
)

// Relay message types (JSON text frames); docs/protocol.md section 12 describes them.
const (
	// TypeRelayOpen asks the server for a relay session to a node; the answer is
	// relayReady once the node accepts, or an error.
	TypeRelayOpen Type = "relayOpen"
	// TypeRelayReady is the target's acceptance (client → server, answered ok) and the
	// opener's answer (server → client, carrying the opener's session).
	TypeRelayReady Type = "relayReady"
	// TypeRelayIncoming tells a node that another node opened a session to it.
	TypeRelayIncoming Type = "relayIncoming"
	// TypeRelayClose ends (or, before relayReady, refuses) a session.
	TypeRelayClose Type = "relayClose"
	// TypeRelayClosed tells a node the server ended one of its sessions, and why.
	TypeRelayClosed Type = "relayClosed"
)

// Binary relay frames. A binary WebSocket message holds one or more frames back to back:
//
//	type (1 byte, RelayFrameData) | session (4 bytes, big endian, not 0) |
//	length (2 bytes, big endian, 1..MaxRelayPayload) | payload
const (
	RelayFrameData  = byte(0x01)
	RelayHeaderLen  = 7
	MaxRelayPayload = 8192
)

// RelayFrame is one data frame of a binary relay message. Payload aliases the message.
type RelayFrame struct {
	Session uint32
	Payload []byte
}

// AppendRelayFrame appends a data frame carrying payload on session to dst.
func AppendRelayFrame(dst []byte, session uint32, payload []byte) []byte {
	dst = append(dst, RelayFrameData, 0, 0, 0, 0, 0, 0)
	h := dst[len(dst)-6:]
	binary.BigEndian.PutUint32(h, session)
	binary.BigEndian.PutUint16(h[4:], uint16(len(payload)))
	return append(dst, payload...)
}

// nextRelayFrame decodes the first frame of b. On error, f.Session is the bad frame's
// session when its header got that far, so the session can be closed.
func nextRelayFrame(b []byte) (f RelayFrame, rest []byte, err *Error) {
	if len(b) >= 5 {
		f.Session = binary.BigEndian.Uint32(b[1:5])
	}
	switch {
	case len(b) < RelayHeaderLen:
		return f, nil, errorf(CodeMalformed, "relay frame: %d bytes, shorter than the %d-byte header", len(b), RelayHeaderLen)
	case b[0] != RelayFrameData:
		return f, nil, errorf(CodeMalformed, "relay frame: unknown type 0x%02x", b[0])
	case f.Session == 0:
		return f, nil, errorf(CodeMalformed, "relay frame: session 0")
	}
	n := int(binary.BigEndian.Uint16(b[5:7]))
	switch {
	case n == 0:
		return f, nil, errorf(CodeMalformed, "relay frame: empty datagram on session %d", f.Session)
	case n > MaxRelayPayload:
		return f, nil, errorf(CodeMalformed, "relay frame: %d-byte datagram on session %d, over %d", n, f.Session, MaxRelayPayload)
	case len(b)-RelayHeaderLen < n:
		return f, nil, errorf(CodeMalformed, "relay frame: header says %d bytes, %d follow", n, len(b)-RelayHeaderLen)
	}
	f.Payload = b[RelayHeaderLen : RelayHeaderLen+n : RelayHeaderLen+n]
	return f, b[RelayHeaderLen+n:], nil
}

// ParseRelayFrames decodes a binary relay message. It returns the frames before the
// first bad one and, for a bad one, an *Error with CodeMalformed.
func ParseRelayFrames(msg []byte) ([]RelayFrame, error) {
	if len(msg) == 0 {
		return nil, errorf(CodeMalformed, "relay frame: empty binary message")
	}
	var out []RelayFrame
	for len(msg) > 0 {
		f, rest, err := nextRelayFrame(msg)
		if err != nil {
			return out, err
		}
		out = append(out, f)
		msg = rest
	}
	return out, nil
}

// Bodies of the relay's JSON frames.

type relayOpenBody struct {
	NodeID string `json:"nodeID"`
	// Tag is passed to the target as it is, so it can tell what the session is for.
	Tag string `json:"tag,omitempty"`
}

type relaySessionBody struct {
	Session uint32 `json:"session"`
	NodeID  string `json:"nodeID,omitempty"`
	Tag     string `json:"tag,omitempty"`
}

type relayCloseBody struct {
	Session uint32 `json:"session"`
	Reason  string `json:"reason,omitempty"`
}

type relayClosedBody struct {
	Session uint32 `json:"session"`
	Code    Code   `json:"code"`
	Message string `json:"message,omitempty"`
}

// Frames between rendezvous servers, carried by the store's router to the server a node
// is attached to. They start with relayInternal, which no JSON frame can, followed by
// records:
//
//	'O' open:  from(32) fromSid(4) tagLen(1) tag
//	'R' ready: toSid(4) from(32) fromSid(4)
//	'C' close: toSid(4) from(32) fromSid(4) codeLen(1) code msgLen(2) msg
//	'D' data:  toSid(4) from(32) fromSid(4) len(2) payload
//
// toSid 0 in a close means "the session whose peer is (from, fromSid)": an opener that
// gives up before the target answered does not know the target's session yet.
const relayInternal byte = 0x00

const (
	recOpen  byte = 'O'
	recReady byte = 'R'
	recClose byte = 'C'
	recData  byte = 'D'
)

// relayRecord is one decoded inter-server record.
type relayRecord struct {
	kind           byte
	toSid, fromSid uint32
	from           identity.NodeID
	tag            string // open
	code           Code   // close
	msg            string // close
	payload        []byte // data; aliases the frame
}

func appendRecHead(dst []byte, kind byte, toSid uint32, from identity.NodeID, fromSid uint32) []byte {
	dst = append(dst, kind)
	dst = binary.BigEndian.AppendUint32(dst, toSid)
	dst = append(dst, from[:]...)
	return binary.BigEndian.AppendUint32(dst, fromSid)
}

func appendOpenRec(dst []byte, from identity.NodeID, fromSid uint32, tag string) []byte {
	dst = append(dst, recOpen)
	dst = append(dst, from[:]...)
	dst = binary.BigEndian.AppendUint32(dst, fromSid)
	dst = append(dst, byte(len(tag)))
	return append(dst, tag...)
}

func appendReadyRec(dst []byte, toSid uint32, from identity.NodeID, fromSid uint32) []byte {
	return appendRecHead(dst, recReady, toSid, from, fromSid)
}

func appendCloseRec(dst []byte, toSid uint32, from identity.NodeID, fromSid uint32, code Code, msg string) []byte {
	code = Code(clipString(string(code), 255))
	msg = clipString(msg, maxCloseMsg)
	dst = appendRecHead(dst, recClose, toSid, from, fromSid)
	dst = append(dst, byte(len(code)))
	dst = append(dst, code...)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(msg)))
	return append(dst, msg...)
}

func appendDataRec(dst []byte, toSid uint32, from identity.NodeID, fromSid uint32, p []byte) []byte {
	dst = appendRecHead(dst, recData, toSid, from, fromSid)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(p)))
	return append(dst, p...)
}

// maxCloseMsg bounds a close record's message: servers write no longer ones, and read
// none either.
const maxCloseMsg = 1024

func clipString(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// nextRecord decodes the first record of b (after the relayInternal byte).
func nextRecord(b []byte) (r relayRecord, rest []byte, err error) {
	short := func() error { return fmt.Errorf("signal: relay record %q truncated", r.kind) }
	if len(b) == 0 {
		return r, nil, fmt.Errorf("signal: empty relay record")
	}
	r.kind, b = b[0], b[1:]
	if r.kind == recOpen {
		if len(b) < 32+4+1 {
			return r, nil, short()
		}
		copy(r.from[:], b)
		r.fromSid = binary.BigEndian.Uint32(b[32:])
		n := int(b[36])
		b = b[37:]
		if len(b) < n {
			return r, nil, short()
		}
		r.tag, b = string(b[:n]), b[n:]
		return r, b, nil
	}
	if r.kind != recReady && r.kind != recClose && r.kind != recData {
		return r, nil, fmt.Errorf("signal: unknown relay record 0x%02x", r.kind)
	}
	if len(b) < 4+32+4 {
		return r, nil, short()
	}
	r.toSid = binary.BigEndian.Uint32(b)
	copy(r.from[:], b[4:])
	r.fromSid = binary.BigEndian.Uint32(b[36:])
	b = b[40:]
	switch r.kind {
	case recClose:
		if len(b) < 1 || len(b) < 1+int(b[0])+2 {
			return r, nil, short()
		}
		n := int(b[0])
		r.code = Code(b[1 : 1+n])
		b = b[1+n:]
		m := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if m > maxCloseMsg {
			return r, nil, fmt.Errorf("signal: relay close record message of %d bytes, more than %d", m, maxCloseMsg)
		}
		if len(b) < m {
			return r, nil, short()
		}
		r.msg, b = string(b[:m]), b[m:]
	case recData:
		if len(b) < 2 {
			return r, nil, short()
		}
		n := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if n == 0 || n > MaxRelayPayload || len(b) < n {
			return r, nil, short()
		}
		r.payload, b = b[:n:n], b[n:]
	}
	return r, b, nil
}
