package party

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"time"

	"peerlink/identity"
)

// Invite is a member's signed permission for whoever holds it to join a party until it
// expires. Its text form (NewInvite) is one URL-safe line.
type Invite struct {
	Party     string
	Inviter   identity.NodeID
	Expires   time.Time
	Nonce     string // base64url, makes every invite distinct
	Signature []byte // the inviter's ed25519 signature over SigningInput
}

// InvitePrefix starts every invite token, so a pasted token is recognisable.
const InvitePrefix = "plinv1_"

// MaxInviteLen bounds a token; real ones are about 210 characters.
const MaxInviteLen = 256

const nonceLen = 12

// SigningInput returns the bytes the inviter signs: a version line, then the party, the
// inviter, the expiry (Unix seconds) and the nonce, each ending in a newline.
func (inv *Invite) SigningInput() []byte {
	b := make([]byte, 0, 64+len(inv.Party)+identity.TextLen+len(inv.Nonce))
	b = append(b, "peerlink/invite/v1\n"...)
	b = append(b, inv.Party...)
	b = append(b, '\n')
	b = inv.Inviter.AppendText(b)
	b = append(b, '\n')
	b = strconv.AppendInt(b, inv.Expires.Unix(), 10)
	b = append(b, '\n')
	b = append(b, inv.Nonce...)
	return append(b, '\n')
}

// NewInvite signs an invite to party from id, valid for ttl from now, and returns its
// token: "plinv1_" and the base64url of name length, name, inviter key, expiry, nonce
// and signature.
func NewInvite(id *identity.Identity, party string, ttl time.Duration, now time.Time) (string, error) {
	if err := ValidName(party); err != nil {
		return "", err
	}
	if ttl <= 0 {
		return "", fmt.Errorf("party: invite lifetime %v is not positive", ttl)
	}
	var nonce [nonceLen]byte
	rand.Read(nonce[:])
	inv := &Invite{
		Party:   party,
		Inviter: id.NodeID(),
		Expires: time.Unix(now.Add(ttl).Unix(), 0),
		Nonce:   base64.RawURLEncoding.EncodeToString(nonce[:]),
	}
	inv.Signature = id.Sign(inv.SigningInput())
	b := make([]byte, 0, 1+len(party)+32+8+nonceLen+ed25519.SignatureSize)
	b = append(b, byte(len(party)))
	b = append(b, party...)
	b = append(b, inv.Inviter[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(inv.Expires.Unix()))
	b = append(b, nonce[:]...)
	b = append(b, inv.Signature...)
	return InvitePrefix + base64.RawURLEncoding.EncodeToString(b), nil
}

// ParseInvite decodes a token. It checks the form only: Verify checks the signature and
// the expiry. Surrounding spaces (from pasting) are ignored.
func ParseInvite(token string) (*Invite, error) {
	token = strings.TrimSpace(token)
	malformed := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInviteMalformed}, args...)...)
	}
	if len(token) > MaxInviteLen {
		return nil, malformed("%d characters, at most %d", len(token), MaxInviteLen)
	}
	rest, ok := strings.CutPrefix(token, InvitePrefix)
	if !ok {
		return nil, malformed("it does not start with %q (was it pasted whole?)", InvitePrefix)
	}
	b, err := base64.RawURLEncoding.DecodeString(rest)
	if err != nil {
		return nil, malformed("not base64url (was it cut short or changed?)")
	}
	if len(b) < 1 {
		return nil, malformed("empty")
	}
	n := int(b[0])
	if len(b) != 1+n+32+8+nonceLen+ed25519.SignatureSize {
		return nil, malformed("%d bytes, which does not fit a party name of %d (was it cut short?)", len(b), n)
	}
	inv := &Invite{Party: string(b[1 : 1+n])}
	if err := ValidName(inv.Party); err != nil {
		return nil, malformed("%v", err)
	}
	b = b[1+n:]
	copy(inv.Inviter[:], b[:32])
	exp := binary.BigEndian.Uint64(b[32:40])
	if exp > 1<<40 { // far beyond any real date; keeps time arithmetic sane
		return nil, malformed("expiry out of range")
	}
	inv.Expires = time.Unix(int64(exp), 0)
	inv.Nonce = base64.RawURLEncoding.EncodeToString(b[40 : 40+nonceLen])
	inv.Signature = append([]byte(nil), b[40+nonceLen:]...)
	return inv, nil
}

// Verify checks that the inviter signed the invite and that it has not expired. Whether
// the inviter is still a member is the server's check.
func (inv *Invite) Verify(now time.Time) error {
	if !inv.Inviter.Verify(inv.SigningInput(), inv.Signature) {
		return fmt.Errorf("%w: the invite to party %s does not carry %s's signature (changed after it was made?)", ErrInviteForged, inv.Party, inv.Inviter.Short())
	}
	if !now.Before(inv.Expires) {
		ago := now.Sub(inv.Expires).Round(time.Second)
		return fmt.Errorf("%w: invite to party %s expired %v ago (at %s); ask a member for a new one",
			ErrInviteExpired, inv.Party, ago, inv.Expires.UTC().Format(time.RFC3339))
	}
	return nil
}
