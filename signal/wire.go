// Package signal is peerlink's rendezvous: a WebSocket server where nodes authenticate
// with their identity, publish how to reach them, look each other up and exchange signed
// signaling messages (offer, answer, candidate, punch, bye), and the client for it.
//
// The wire protocol is described in docs/protocol.md; this file is its encoding.
package signal

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"peerlink/identity"
)

// Subprotocol is the WebSocket subprotocol of this protocol version.
const Subprotocol = "peerlink.signal.v1"

// Type is a message type: the one key of a frame object besides "id".
type Type string

// Message types.
const (
	// Routed between peers and signed by the sender.
	TypeOffer     Type = "offer"
	TypeAnswer    Type = "answer"
	TypeCandidate Type = "iceCandidate"
	TypePunch     Type = "punch"
	TypeBye       Type = "bye"

	// Client to server.
	TypeAuth          Type = "auth"
	TypePublish       Type = "publish" // signed like a routed message, stored by the server
	TypeLookup        Type = "lookup"
	TypeTURN          Type = "turn"
	TypeRelayRegister Type = "relayRegister"
	TypeRelayList     Type = "relayList"
	TypePartyCreate   Type = "partyCreate"
	TypePartyJoin     Type = "partyJoin"
	TypePartyLeave    Type = "partyLeave"
	TypePartyKick     Type = "partyKick"
	TypePartyGet      Type = "partyGet"
	TypePartyList     Type = "partyList"

	// Server to client.
	TypeChallenge       Type = "challenge"
	TypeWelcome         Type = "welcome"
	TypeOK              Type = "ok"
	TypeError           Type = "error"
	TypePeer            Type = "peer"
	TypeTURNCredentials Type = "turnCredentials"
	TypeRelays          Type = "relays"
	TypeParty           Type = "party"
	TypeParties         Type = "parties"
)

// Routed reports whether t is a peer-to-peer message the server forwards.
func (t Type) Routed() bool {
	switch t {
	case TypeOffer, TypeAnswer, TypeCandidate, TypePunch, TypeBye:
		return true
	}
	return false
}

// bodyKey is the envelope field holding a signed message's body.
func (t Type) bodyKey() string {
	switch t {
	case TypeOffer, TypeAnswer, TypePublish:
		return "connectionInfo"
	case TypeCandidate:
		return "candidate"
	case TypePunch:
		return "punch"
	case TypeBye:
		return "bye"
	}
	return ""
}

// Limits of the message format.
const (
	MaxSessionLen = 64
	MinNonceLen   = 16
	MaxNonceLen   = 64
	MaxCandidates = 32
	MaxAddresses  = 64
	MaxReasonLen  = 256
)

// Frame is one WebSocket text message: a JSON object with an optional request "id" and
// exactly one other key, the message type, whose value is the body.
type Frame struct {
	ID   uint64
	Type Type
	Body json.RawMessage
}

// ParseFrame decodes a frame. Errors are *Error with CodeMalformed.
func ParseFrame(b []byte) (Frame, error) {
	var f Frame
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return f, errorf(CodeMalformed, "frame is not a JSON object: %v", err)
	}
	if m == nil {
		return f, errorf(CodeMalformed, "frame is not a JSON object")
	}
	for k, v := range m {
		if k == "id" {
			id, err := strconv.ParseUint(string(v), 10, 64)
			if err != nil {
				return f, errorf(CodeMalformed, "id %.20s is not an unsigned integer", v)
			}
			f.ID = id
			continue
		}
		if f.Type != "" {
			return f, errorf(CodeMalformed, "frame has two message types (%.32q and %.32q)", f.Type, k)
		}
		f.Type, f.Body = Type(k), v
	}
	if f.Type == "" {
		return f, errorf(CodeMalformed, "frame has no message type")
	}
	if len(f.Body) == 0 || f.Body[0] != '{' {
		return f, errorf(CodeMalformed, "%.32s body is not a JSON object", f.Type)
	}
	return f, nil
}

// AppendFrame appends the frame {"id":id,"<t>":body} to dst; id 0 is left out. body must
// be a JSON object and is copied byte for byte, which keeps signed bodies intact.
func AppendFrame(dst []byte, id uint64, t Type, body []byte) []byte {
	dst = append(dst, '{')
	if id != 0 {
		dst = append(dst, `"id":`...)
		dst = strconv.AppendUint(dst, id, 10)
		dst = append(dst, ',')
	}
	dst = append(dst, '"')
	dst = append(dst, t...)
	dst = append(dst, `":`...)
	dst = append(dst, body...)
	return append(dst, '}')
}

// marshalFrame encodes v as the body of a frame.
func marshalFrame(id uint64, t Type, v any) ([]byte, error) {
	body, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return AppendFrame(nil, id, t, body), nil
}

// envelope is the wire form of a signed message.
type envelope struct {
	From           string          `json:"fromNodeID"`
	To             string          `json:"toNodeID,omitempty"`
	Session        string          `json:"sessionID,omitempty"`
	Timestamp      int64           `json:"timestamp"`
	Nonce          string          `json:"nonce"`
	ConnectionInfo json.RawMessage `json:"connectionInfo,omitempty"`
	Candidate      json.RawMessage `json:"candidate,omitempty"`
	Punch          json.RawMessage `json:"punch,omitempty"`
	Bye            json.RawMessage `json:"bye,omitempty"`
	Signature      string          `json:"signature"`
}

func (e *envelope) body(t Type) *json.RawMessage {
	switch t.bodyKey() {
	case "connectionInfo":
		return &e.ConnectionInfo
	case "candidate":
		return &e.Candidate
	case "punch":
		return &e.Punch
	case "bye":
		return &e.Bye
	}
	return nil
}

// Message is a signed message: routed between peers (offer, answer, iceCandidate, punch,
// bye) or published to the server (publish).
type Message struct {
	Type Type
	From identity.NodeID
	// To is the recipient; zero for publish.
	To identity.NodeID
	// Session ties the messages of one connection attempt together; a UUID is typical.
	Session string
	// Time is when the sender signed; it travels in milliseconds.
	Time time.Time
	// Nonce is unique per message from a sender, for replay detection.
	Nonce string

	// The body: exactly one is set, matching Type. Info for offer, answer and publish.
	Info      *ConnectionInfo
	Candidate *Candidate
	Punch     *Punch
	Bye       *Bye

	// Body is the body's JSON exactly as signed. Sign sets it; decoding keeps the bytes
	// as received, so verification never depends on re-encoding.
	Body json.RawMessage
	// Signature is the sender's ed25519 signature over SigningInput.
	Signature []byte
}

// SigningInput returns the bytes a message's signature covers: a version line, then the
// type, sender, recipient, session, timestamp (decimal milliseconds) and nonce, each
// ending in a newline, then the body's JSON bytes exactly as carried in the frame.
// None of the fields before the body can contain a newline, so the encoding is
// unambiguous.
func SigningInput(t Type, from, to identity.NodeID, session string, ts int64, nonce string, body []byte) []byte {
	b := make([]byte, 0, 24+len(t)+2*identity.TextLen+len(session)+20+len(nonce)+len(body)+8)
	b = append(b, "peerlink/signal/v1\n"...)
	b = append(b, t...)
	b = append(b, '\n')
	if !from.IsZero() {
		b = from.AppendText(b)
	}
	b = append(b, '\n')
	if !to.IsZero() {
		b = to.AppendText(b)
	}
	b = append(b, '\n')
	b = append(b, session...)
	b = append(b, '\n')
	b = strconv.AppendInt(b, ts, 10)
	b = append(b, '\n')
	b = append(b, nonce...)
	b = append(b, '\n')
	return append(b, body...)
}

func (m *Message) signingInput() []byte {
	return SigningInput(m.Type, m.From, m.To, m.Session, m.Time.UnixMilli(), m.Nonce, m.Body)
}

// NewNonce returns a fresh random nonce (16 bytes, base64url).
func NewNonce() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// typedBody returns the body field matching m.Type.
func (m *Message) typedBody() (any, error) {
	var v any
	switch m.Type.bodyKey() {
	case "connectionInfo":
		if m.Info != nil {
			v = m.Info
		}
	case "candidate":
		if m.Candidate != nil {
			v = m.Candidate
		}
	case "punch":
		if m.Punch != nil {
			v = m.Punch
		}
	case "bye":
		if m.Bye != nil {
			v = m.Bye
		} else {
			v = &Bye{}
		}
	default:
		return nil, fmt.Errorf("signal: %q is not a signed message type", m.Type)
	}
	if v == nil {
		return nil, fmt.Errorf("signal: %s message without its %s body", m.Type, m.Type.bodyKey())
	}
	return v, nil
}

// Sign makes m ready to send from id: it sets From, fills Time (with now) and Nonce when
// they are empty, encodes the body and signs. It validates the message first.
func (m *Message) Sign(id *identity.Identity, now time.Time) error {
	v, err := m.typedBody()
	if err != nil {
		return err
	}
	m.From = id.NodeID()
	if m.Time.IsZero() {
		m.Time = now
	}
	m.Time = time.UnixMilli(m.Time.UnixMilli())
	if m.Nonce == "" {
		m.Nonce = NewNonce()
	}
	if err := m.checkHeader(); err != nil {
		return err
	}
	if err := validateBody(v); err != nil {
		return err
	}
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("signal: encode %s body: %w", m.Type, err)
	}
	m.Body = body
	m.Signature = id.Sign(m.signingInput())
	return nil
}

// envelope returns the wire form of a signed m.
func (m *Message) envelope() (*envelope, error) {
	if len(m.Signature) == 0 || len(m.Body) == 0 {
		return nil, fmt.Errorf("signal: %s message is not signed", m.Type)
	}
	e := &envelope{
		From:      m.From.String(),
		To:        m.To.String(),
		Session:   m.Session,
		Timestamp: m.Time.UnixMilli(),
		Nonce:     m.Nonce,
		Signature: hex.EncodeToString(m.Signature),
	}
	p := e.body(m.Type)
	if p == nil {
		return nil, fmt.Errorf("signal: %q is not a signed message type", m.Type)
	}
	*p = m.Body
	return e, nil
}

// AppendFrame appends m, signed, as a frame with request id (0 for none).
func (m *Message) AppendFrame(dst []byte, id uint64) ([]byte, error) {
	e, err := m.envelope()
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	return AppendFrame(dst, id, m.Type, b), nil
}

func validSession(s string) bool {
	if len(s) == 0 || len(s) > MaxSessionLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == ':') {
			return false
		}
	}
	return true
}

func validNonce(s string) bool {
	if len(s) < MinNonceLen || len(s) > MaxNonceLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// checkHeader validates the header fields of m.
func (m *Message) checkHeader() error {
	if m.From.IsZero() {
		return errorf(CodeMalformed, "no fromNodeID")
	}
	if m.Type.Routed() {
		if m.To.IsZero() {
			return errorf(CodeMalformed, "no toNodeID")
		}
		if !validSession(m.Session) {
			return errorf(CodeMalformed, "sessionID must be 1 to %d of A-Z a-z 0-9 - _ . :", MaxSessionLen)
		}
	} else if !m.To.IsZero() || m.Session != "" {
		return errorf(CodeMalformed, "%s carries no toNodeID or sessionID", m.Type)
	}
	if m.Time.UnixMilli() <= 0 {
		return errorf(CodeMalformed, "timestamp must be positive milliseconds since 1970")
	}
	if !validNonce(m.Nonce) {
		return errorf(CodeMalformed, "nonce must be %d to %d base64url characters", MinNonceLen, MaxNonceLen)
	}
	return nil
}

// decodeEnvelope parses a signed message's header, body bytes and signature, without
// decoding the body: what a server needs to route it.
func decodeEnvelope(t Type, raw []byte) (*Message, error) {
	if t.bodyKey() == "" {
		return nil, errorf(CodeUnsupported, "%.32q is not a signed message type", t)
	}
	var e envelope
	if err := json.Unmarshal(raw, &e); err != nil {
		return nil, errorf(CodeMalformed, "%s: %v", t, err)
	}
	m := &Message{Type: t, Session: e.Session, Nonce: e.Nonce}
	var err error
	if m.From, err = identity.ParseNodeID(e.From); err != nil {
		return nil, errorf(CodeMalformed, "fromNodeID: %v", err)
	}
	if e.To != "" {
		if m.To, err = identity.ParseNodeID(e.To); err != nil {
			return nil, errorf(CodeMalformed, "toNodeID: %v", err)
		}
	}
	m.Time = time.UnixMilli(e.Timestamp)
	if err := m.checkHeader(); err != nil {
		return nil, err
	}
	for _, k := range []Type{TypeOffer, TypeCandidate, TypePunch, TypeBye} {
		if p := e.body(k); len(*p) != 0 && k.bodyKey() != t.bodyKey() {
			return nil, errorf(CodeMalformed, "%s message carries a %s", t, k.bodyKey())
		}
	}
	m.Body = *e.body(t)
	if len(m.Body) == 0 || m.Body[0] != '{' {
		return nil, errorf(CodeMalformed, "%s needs a %s object", t, t.bodyKey())
	}
	if len(e.Signature) != 128 {
		return nil, errorf(CodeBadSignature, "signature must be 128 hex digits")
	}
	if m.Signature, err = hex.DecodeString(e.Signature); err != nil {
		return nil, errorf(CodeBadSignature, "signature is not hex")
	}
	return m, nil
}

// DecodeMessage parses a signed message of type t from a frame's body, including its
// typed body. It does not verify the signature: see Verify.
func DecodeMessage(t Type, raw []byte) (*Message, error) {
	m, err := decodeEnvelope(t, raw)
	if err != nil {
		return nil, err
	}
	if err := m.decodeBody(); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *Message) decodeBody() error {
	var v any
	switch m.Type.bodyKey() {
	case "connectionInfo":
		m.Info = new(ConnectionInfo)
		v = m.Info
	case "candidate":
		m.Candidate = new(Candidate)
		v = m.Candidate
	case "punch":
		m.Punch = new(Punch)
		v = m.Punch
	case "bye":
		m.Bye = new(Bye)
		v = m.Bye
	}
	dec := json.NewDecoder(bytes.NewReader(m.Body))
	if err := dec.Decode(v); err != nil {
		return errorf(CodeMalformed, "%s: %v", m.Type.bodyKey(), err)
	}
	return validateBody(v)
}

// verifySignature checks m.Signature against m.From.
func (m *Message) verifySignature() error {
	if !m.From.Verify(m.signingInput(), m.Signature) {
		return errorf(CodeBadSignature, "%s from %s does not verify", m.Type, m.From.Short())
	}
	return nil
}

// Verify checks a received message: that it is addressed to me (skipped when me is
// zero), that its timestamp is within skew of now, and that its signature is the
// sender's. Replays are the ReplayGuard's job, after Verify succeeds. The errors are
// *Error with codes wrong_recipient, stale and bad_signature.
func (m *Message) Verify(me identity.NodeID, now time.Time, skew time.Duration) error {
	if !me.IsZero() && m.To != me {
		return errorf(CodeWrongRecipient, "%s is for %s, not %s", m.Type, m.To.Short(), me.Short())
	}
	if d := now.Sub(m.Time); d > skew || d < -skew {
		return errorf(CodeStale, "%s timestamp is %v away from now (allowed %v)", m.Type, d.Round(time.Millisecond), skew)
	}
	return m.verifySignature()
}
