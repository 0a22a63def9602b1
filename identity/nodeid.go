// Package identity is a node's long-term ed25519 key pair and NodeID, the text form of its
// public key that peers use to name, address and authenticate each other.
package identity

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base32"
	"errors"
	"fmt"
)

// NodeID is a node's ed25519 public key. Its text form (String) is stable and safe to
// copy, paste and put in URLs, file names and NATS subjects. The zero NodeID is not a
// valid key and prints as "".
type NodeID [ed25519.PublicKeySize]byte

// Text form: "pl" followed by the lowercase, unpadded RFC 4648 base32 of the 32-byte key
// and a 3-byte checksum (the first bytes of SHA-256 over the key). 35 bytes are exactly 56
// base32 digits, so every NodeID has one spelling; the checksum catches typos.
const (
	prefix      = "pl"
	checksumLen = 3
	rawLen      = ed25519.PublicKeySize + checksumLen
	// TextLen is the length of a NodeID's text form.
	TextLen = len(prefix) + rawLen*8/5
)

var b32 = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// ErrMalformedNodeID is returned (wrapped) by ParseNodeID for text that is not a NodeID.
var ErrMalformedNodeID = errors.New("identity: malformed NodeID")

// ParseNodeID parses the text form. Errors wrap ErrMalformedNodeID and say what is wrong.
func ParseNodeID(s string) (NodeID, error) {
	var id NodeID
	if len(s) != TextLen {
		return id, fmt.Errorf("%w: %q has %d characters, want %d", ErrMalformedNodeID, clip(s), len(s), TextLen)
	}
	if s[:len(prefix)] != prefix {
		return id, fmt.Errorf("%w: %q does not start with %q", ErrMalformedNodeID, clip(s), prefix)
	}
	var raw [rawLen]byte
	n, err := b32.Decode(raw[:], []byte(s[len(prefix):]))
	if err != nil || n != rawLen {
		return id, fmt.Errorf("%w: %q is not lowercase base32", ErrMalformedNodeID, clip(s))
	}
	copy(id[:], raw[:ed25519.PublicKeySize])
	sum := checksum(id)
	if !bytes.Equal(sum[:], raw[ed25519.PublicKeySize:]) {
		return NodeID{}, fmt.Errorf("%w: %q fails its checksum (a mistyped character?)", ErrMalformedNodeID, clip(s))
	}
	return id, nil
}

// MustParseNodeID is ParseNodeID for constants in tests and examples; it panics on error.
func MustParseNodeID(s string) NodeID {
	id, err := ParseNodeID(s)
	if err != nil {
		panic(err)
	}
	return id
}

func checksum(id NodeID) [checksumLen]byte {
	h := sha256.Sum256(id[:])
	return [checksumLen]byte(h[:checksumLen])
}

// clip keeps error messages short when the input is long.
func clip(s string) string {
	if len(s) > TextLen+8 {
		return s[:TextLen] + "…"
	}
	return s
}

// String returns the text form, or "" for the zero NodeID.
func (id NodeID) String() string {
	if id.IsZero() {
		return ""
	}
	return string(id.AppendText(nil))
}

// AppendText appends the text form to b.
func (id NodeID) AppendText(b []byte) []byte {
	var raw [rawLen]byte
	copy(raw[:], id[:])
	sum := checksum(id)
	copy(raw[ed25519.PublicKeySize:], sum[:])
	b = append(b, prefix...)
	return b32.AppendEncode(b, raw[:])
}

// Short returns an abbreviation for logs ("pl" and the first 8 digits).
func (id NodeID) Short() string {
	s := id.String()
	if len(s) < 10 {
		return s
	}
	return s[:10]
}

// IsZero reports whether id is the zero NodeID.
func (id NodeID) IsZero() bool { return id == NodeID{} }

// PublicKey returns id as an ed25519 public key.
func (id NodeID) PublicKey() ed25519.PublicKey { return ed25519.PublicKey(id[:]) }

// Verify reports whether sig is id's valid signature of msg.
func (id NodeID) Verify(msg, sig []byte) bool {
	if id.IsZero() || len(sig) != ed25519.SignatureSize {
		return false
	}
	return ed25519.Verify(id[:], msg, sig)
}

// MarshalText returns the text form. The zero NodeID is an error, so one is never sent
// where a peer expects a key.
func (id NodeID) MarshalText() ([]byte, error) {
	if id.IsZero() {
		return nil, errors.New("identity: marshal of zero NodeID")
	}
	return id.AppendText(nil), nil
}

// UnmarshalText parses the text form.
func (id *NodeID) UnmarshalText(b []byte) error {
	v, err := ParseNodeID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}
