package identity

import (
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"

	"filippo.io/edwards25519"
)

// ErrBadPeerKey means a NodeID is not a usable public key (a low-order point).
var ErrBadPeerKey = errors.New("identity: peer key unusable for key agreement")

// SharedKey derives a key that only this node and peer can compute: X25519 between the
// two nodes' keys (their ed25519 keys in Montgomery form), expanded with HKDF-SHA256 over
// info. Both sides get the same bytes for the same info. Peers use it to authenticate
// traffic that a rendezvous server relays or could see, without the server, which knows
// only public keys, being able to forge it.
func (i *Identity) SharedKey(peer NodeID, info []byte, size int) ([]byte, error) {
	// The X25519 scalar of an ed25519 key is the clamped first half of SHA-512(seed);
	// ecdh clamps it.
	h := sha512.Sum512(i.priv.Seed())
	priv, err := ecdh.X25519().NewPrivateKey(h[:32])
	if err != nil {
		return nil, err
	}
	p, err := new(edwards25519.Point).SetBytes(peer[:])
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPeerKey, err)
	}
	pub, err := ecdh.X25519().NewPublicKey(p.BytesMontgomery())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPeerKey, err)
	}
	secret, err := priv.ECDH(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPeerKey, err)
	}
	return hkdf.Key(sha256.New, secret, nil, "peerlink/shared/v1\n"+string(info), size)
}
