package identity

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// Identity is a node's key pair. It is safe for concurrent use.
type Identity struct {
	priv ed25519.PrivateKey
	id   NodeID
}

// Errors from loading key files.
var (
	// ErrInsecureFile: the key file can be read or written by group or others. Peerlink
	// refuses such a file rather than silently tightening it, because a key that others
	// could read must be treated as compromised: make a new one, or chmod 600 the file
	// if you know nobody did.
	ErrInsecureFile = errors.New("identity: key file is accessible to group or others")
	// ErrBadKeyFile: the file is not a peerlink identity (a PEM "PRIVATE KEY" block
	// holding a PKCS #8 ed25519 key).
	ErrBadKeyFile = errors.New("identity: not an ed25519 private key file")
)

// Generate returns a new random identity.
func Generate() (*Identity, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("identity: generate: %w", err)
	}
	return FromPrivateKey(priv), nil
}

// FromPrivateKey wraps an existing ed25519 private key.
func FromPrivateKey(priv ed25519.PrivateKey) *Identity {
	i := &Identity{priv: priv}
	copy(i.id[:], priv.Public().(ed25519.PublicKey))
	return i
}

// NodeID returns the identity's NodeID.
func (i *Identity) NodeID() NodeID { return i.id }

// Sign signs msg.
func (i *Identity) Sign(msg []byte) []byte { return ed25519.Sign(i.priv, msg) }

// PrivateKey returns the private key.
func (i *Identity) PrivateKey() ed25519.PrivateKey { return i.priv }

// DefaultPath returns where the peerlink command keeps the identity: $PEERLINK_IDENTITY
// when set, else peerlink/identity.key under the user's configuration directory.
func DefaultPath() (string, error) {
	if p := os.Getenv("PEERLINK_IDENTITY"); p != "" {
		return p, nil
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("identity: no default path (set PEERLINK_IDENTITY or pass a file): %w", err)
	}
	return filepath.Join(dir, "peerlink", "identity.key"), nil
}

// Load reads the identity kept at path. It refuses a file whose permissions let group or
// others access it (ErrInsecureFile).
func Load(path string) (*Identity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrBadKeyFile, path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %04o, want 0600", ErrInsecureFile, path, perm)
	}
	const maxSize = 4096 // a PEM ed25519 key is about 120 bytes
	b, err := io.ReadAll(io.LimitReader(f, maxSize+1))
	if err != nil {
		return nil, fmt.Errorf("identity: read %s: %w", path, err)
	}
	if len(b) > maxSize {
		return nil, fmt.Errorf("%w: %s is too large", ErrBadKeyFile, path)
	}
	id, err := decodeKey(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadKeyFile, path, err)
	}
	return id, nil
}

func decodeKey(b []byte) (*Identity, error) {
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("no PEM PRIVATE KEY block")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("key is %T, not ed25519", k)
	}
	return FromPrivateKey(priv), nil
}

// encode returns the file form: PKCS #8 in PEM, which standard tools can read.
func (i *Identity) encode() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(i.priv)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// LoadOrCreate loads the identity at path, creating a new one there first if the file
// does not exist. Creation is atomic: the key is written to a temporary file with mode
// 0600 and linked into place only if path still does not exist, so two processes that
// race end up sharing one identity and a reader never sees a half-written key. Missing
// parent directories are created with mode 0700.
func LoadOrCreate(path string) (*Identity, error) {
	id, err := Load(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return id, err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	id, err = Generate()
	if err != nil {
		return nil, err
	}
	b, err := id.encode()
	if err != nil {
		return nil, fmt.Errorf("identity: encode: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".identity-*.tmp")
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	defer os.Remove(tmp.Name())
	// CreateTemp makes 0600 files; Chmod makes sure of it whatever the umask did.
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("identity: %w", err)
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("identity: write: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("identity: sync: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	// Link, unlike Rename, fails when path exists: if another process won the race,
	// use its key.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return Load(path)
		}
		return nil, fmt.Errorf("identity: %w", err)
	}
	return id, nil
}
