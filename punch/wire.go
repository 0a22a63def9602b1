package punch

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	pion "github.com/pion/stun/v3"

	"peerlink/nat"
	"peerlink/stun"
)

// Wire format. A check is a STUN Binding request with
//
//	USERNAME           "<session>:<sender side>" (a or b)
//	USE-CANDIDATE      only in the initiator's nomination
//	XOR-MAPPED-ADDRESS only in a nomination: where the initiator sees the responder
//	MESSAGE-INTEGRITY  HMAC-SHA1 keyed by the session key
//	FINGERPRINT
//
// and its answer a Binding success response with XOR-MAPPED-ADDRESS (the check's
// source), MESSAGE-INTEGRITY and FINGERPRINT. The sender's side in USERNAME keeps a
// node from answering, and so validating, its own checks when they come back to it
// (hairpinning NATs, two peers on one LAN that reuse addresses).

// Errors of the wire format, never returned to callers: invalid messages are dropped.
var (
	errNotCheck    = errors.New("not a check")
	errIntegrity   = errors.New("bad fingerprint or message integrity")
	errWrongSender = errors.New("check from the wrong side")
)

// maxSession bounds the session ID so USERNAME stays within RFC 8489's 513 bytes.
const maxSession = 256

func username(session string, side nat.Side) string { return session + ":" + side.String() }

// splitUsername returns the session and sender side of a USERNAME.
func splitUsername(u string) (string, nat.Side, bool) {
	i := strings.LastIndexByte(u, ':')
	if i <= 0 {
		return "", 0, false
	}
	switch u[i+1:] {
	case "a":
		return u[:i], nat.SideA, true
	case "b":
		return u[:i], nat.SideB, true
	}
	return "", 0, false
}

// useCandidate adds the empty USE-CANDIDATE attribute.
type useCandidate struct{}

func (useCandidate) AddTo(m *pion.Message) error {
	m.Add(pion.AttrUseCandidate, nil)
	return nil
}

func xorAddr(a netip.AddrPort) pion.XORMappedAddress {
	return pion.XORMappedAddress{IP: a.Addr().Unmap().AsSlice(), Port: int(a.Port())}
}

// buildCheck returns a check from side with transaction ID id. A nomination carries
// USE-CANDIDATE and, when valid, seen: the receiver's address as the sender saw it.
func buildCheck(id stun.TransactionID, session string, side nat.Side, key []byte, nominate bool, seen netip.AddrPort) []byte {
	setters := []pion.Setter{pion.BindingRequest, pion.NewTransactionIDSetter(id), pion.NewUsername(username(session, side))}
	if nominate {
		setters = append(setters, useCandidate{})
		if seen.IsValid() {
			setters = append(setters, xorAddr(seen))
		}
	}
	setters = append(setters, pion.MessageIntegrity(key), pion.Fingerprint)
	m, err := pion.Build(setters...)
	if err != nil {
		// Only an over-long USERNAME can fail, and Prepare bounds the session.
		panic(fmt.Sprintf("punch: building a check: %v", err))
	}
	return m.Raw
}

// buildResponse answers the check with transaction ID id that came from src.
func buildResponse(id stun.TransactionID, src netip.AddrPort, key []byte) []byte {
	m, err := pion.Build(pion.BindingSuccess, pion.NewTransactionIDSetter(id), xorAddr(src), pion.MessageIntegrity(key), pion.Fingerprint)
	if err != nil {
		panic(fmt.Sprintf("punch: building a response: %v", err))
	}
	return m.Raw
}

// decode parses a STUN message's framing and attributes, without checking integrity.
func decode(b []byte) (*pion.Message, error) {
	if !stun.IsMessage(b) {
		return nil, errNotCheck
	}
	m := &pion.Message{Raw: append([]byte(nil), b...)}
	if err := m.Decode(); err != nil {
		return nil, errNotCheck
	}
	return m, nil
}

// checkSession returns the session and sender side a decoded message claims.
func checkSession(m *pion.Message) (string, nat.Side, bool) {
	if m.Type != pion.BindingRequest {
		return "", 0, false
	}
	var u pion.Username
	if err := u.GetFrom(m); err != nil {
		return "", 0, false
	}
	return splitUsername(u.String())
}

// authentic verifies that MESSAGE-INTEGRITY (keyed by key) and FINGERPRINT are the
// message's last two attributes and are right. Attributes after MESSAGE-INTEGRITY are not
// covered by it, so nothing but FINGERPRINT may follow it.
func authentic(m *pion.Message, key []byte) bool {
	n := len(m.Attributes)
	if n < 2 || m.Attributes[n-1].Type != pion.AttrFingerprint || m.Attributes[n-2].Type != pion.AttrMessageIntegrity {
		return false
	}
	for _, a := range m.Attributes[:n-2] {
		if a.Type == pion.AttrMessageIntegrity || a.Type == pion.AttrFingerprint {
			return false
		}
	}
	return pion.Fingerprint.Check(m) == nil && pion.MessageIntegrity(key).Check(m) == nil
}

// check is a verified connectivity check.
type check struct {
	id       stun.TransactionID
	nominate bool
	// seen is, in a nomination, where the initiator sees the receiver; otherwise zero.
	seen netip.AddrPort
}

// parseCheck verifies a decoded Binding request of session sent by the peer on side
// from, keyed by key.
func parseCheck(m *pion.Message, session string, from nat.Side, key []byte) (check, error) {
	s, side, ok := checkSession(m)
	if !ok || s != session {
		return check{}, errNotCheck
	}
	if side != from {
		return check{}, errWrongSender
	}
	if !authentic(m, key) {
		return check{}, errIntegrity
	}
	c := check{id: m.TransactionID, nominate: m.Contains(pion.AttrUseCandidate)}
	if c.nominate {
		c.seen = getXORAddr(m)
	}
	return c, nil
}

// parseResponse verifies a Binding success response keyed by key and returns its
// XOR-MAPPED-ADDRESS: the address the peer saw our check come from.
func parseResponse(b []byte, key []byte) (netip.AddrPort, error) {
	m, err := decode(b)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if m.Type != pion.BindingSuccess {
		return netip.AddrPort{}, errNotCheck
	}
	if !authentic(m, key) {
		return netip.AddrPort{}, errIntegrity
	}
	a := getXORAddr(m)
	if !a.IsValid() {
		return netip.AddrPort{}, errNotCheck
	}
	return a, nil
}

func getXORAddr(m *pion.Message) netip.AddrPort {
	var xa pion.XORMappedAddress
	if err := xa.GetFrom(m); err != nil {
		return netip.AddrPort{}
	}
	ip, ok := netip.AddrFromSlice(xa.IP)
	if !ok || xa.Port <= 0 || xa.Port > 65535 {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(xa.Port))
}
