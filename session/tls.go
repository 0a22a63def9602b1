package session

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"time"

	"peerlink/identity"
)

// alpn names the protocol spoken in the session's QUIC connection.
const alpn = "peerlink/1"

// certificate is a self-signed certificate for id's ed25519 key. Nobody vouches for it:
// the key itself is the node's identity, and the peer checks it against the NodeID it
// expects. Its validity is wide so that clocks that disagree do not matter.
func certificate(id *identity.Identity) (tls.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: id.NodeID().String()},
		NotBefore:    now.Add(-24 * time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, id.PrivateKey().Public(), id.PrivateKey())
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("session: certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: id.PrivateKey()}, nil
}

// peerKey returns the NodeID a peer's certificate chain stands for: the ed25519 key of
// a single self-signed certificate. TLS 1.3's CertificateVerify has already proved
// that the peer holds the private key.
func peerKey(rawCerts [][]byte) (identity.NodeID, error) {
	if len(rawCerts) != 1 {
		return identity.NodeID{}, fmt.Errorf("%w: %d certificates, want 1", ErrBadCertificate, len(rawCerts))
	}
	cert, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return identity.NodeID{}, fmt.Errorf("%w: %w", ErrBadCertificate, err)
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok || len(pub) != ed25519.PublicKeySize {
		return identity.NodeID{}, fmt.Errorf("%w: key is %T, want ed25519", ErrBadCertificate, cert.PublicKey)
	}
	if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
		return identity.NodeID{}, fmt.Errorf("%w: not self-signed by its key: %w", ErrBadCertificate, err)
	}
	var id identity.NodeID
	copy(id[:], pub)
	return id, nil
}

// verifier checks the peer's certificate against the NodeID expected and remembers why
// it refused: QUIC reports a refused handshake only as a TLS alert.
type verifier struct {
	want identity.NodeID
	mu   sync.Mutex
	err  error
	fail chan struct{} // closed on the first refusal
}

func newVerifier(want identity.NodeID) *verifier {
	return &verifier{want: want, fail: make(chan struct{})}
}

func (v *verifier) verify(rawCerts [][]byte, _ [][]*x509.Certificate) error {
	got, err := peerKey(rawCerts)
	if err == nil && !bytes.Equal(got[:], v.want[:]) {
		err = fmt.Errorf("%w: the peer is %s, want %s", ErrPeerMismatch, got.Short(), v.want.Short())
	}
	if err != nil {
		v.mu.Lock()
		if v.err == nil {
			v.err = err
			close(v.fail)
		}
		v.mu.Unlock()
	}
	return err
}

func (v *verifier) failure() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.err
}

// tlsConfig is the TLS 1.3 configuration for either side: each presents its
// certificate, each requires and checks the other's.
func tlsConfig(id *identity.Identity, v *verifier, server bool) (*tls.Config, error) {
	cert, err := certificate(id)
	if err != nil {
		return nil, err
	}
	c := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{alpn},
		// Chains are not verified against roots: there are none. verify checks the
		// one thing that matters, the key.
		InsecureSkipVerify:    true,
		VerifyPeerCertificate: v.verify,
		ServerName:            "peerlink",
	}
	if server {
		c.ClientAuth = tls.RequireAnyClientCert
	}
	return c, nil
}

// Certificate errors.
var (
	// ErrPeerMismatch: the peer's certificate is for another NodeID than the connection's
	// peer.
	ErrPeerMismatch = errors.New("session: peer identity mismatch")
	// ErrBadCertificate: the peer's certificate is not a self-signed ed25519 node
	// certificate.
	ErrBadCertificate = errors.New("session: bad peer certificate")
)
