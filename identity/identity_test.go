package identity

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestNodeIDRoundTrip(t *testing.T) {
	for range 50 {
		id, err := Generate()
		if err != nil {
			t.Fatal(err)
		}
		s := id.NodeID().String()
		if len(s) != TextLen || !strings.HasPrefix(s, "pl") || strings.ToLower(s) != s {
			t.Fatalf("NodeID text %q: want %d lowercase characters starting pl", s, TextLen)
		}
		back, err := ParseNodeID(s)
		if err != nil {
			t.Fatalf("ParseNodeID(%q): %v", s, err)
		}
		if back != id.NodeID() {
			t.Fatalf("round trip changed the key")
		}
		b, err := id.NodeID().MarshalText()
		if err != nil || string(b) != s {
			t.Fatalf("MarshalText = %q, %v", b, err)
		}
	}
}

func TestParseNodeIDRejects(t *testing.T) {
	id, _ := Generate()
	good := id.NodeID().String()
	flip := func(i int) string {
		b := []byte(good)
		if b[i] == 'a' {
			b[i] = 'b'
		} else {
			b[i] = 'a'
		}
		return string(b)
	}
	tests := []struct {
		name, in, want string
	}{
		{"empty", "", "characters"},
		{"short", good[:len(good)-1], "characters"},
		{"long", good + "a", "characters"},
		{"prefix", "xx" + good[2:], "start with"},
		{"upper", strings.ToUpper(good[:3]) + good[3:], "start with"},
		{"upper digits", good[:2] + strings.ToUpper(good[2:]), "base32"},
		{"bad alphabet", good[:10] + "1" + good[11:], "base32"},
		{"newline", good[:10] + "\n" + good[11:], "base32"},
		{"typo", flip(20), "checksum"},
		{"typo in checksum", flip(len(good) - 1), "checksum"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseNodeID(tt.in)
			if !errors.Is(err, ErrMalformedNodeID) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("ParseNodeID(%q) = %v, want ErrMalformedNodeID mentioning %q", tt.in, err, tt.want)
			}
		})
	}
	var z NodeID
	if _, err := z.MarshalText(); err == nil {
		t.Error("zero NodeID marshalled")
	}
	if z.String() != "" {
		t.Errorf("zero NodeID String = %q", z.String())
	}
}

func TestSignVerify(t *testing.T) {
	a, _ := Generate()
	b, _ := Generate()
	msg := []byte("hello")
	sig := a.Sign(msg)
	if !a.NodeID().Verify(msg, sig) {
		t.Fatal("own signature rejected")
	}
	if b.NodeID().Verify(msg, sig) {
		t.Fatal("signature verified under another key")
	}
	if a.NodeID().Verify([]byte("hellO"), sig) {
		t.Fatal("signature verified for another message")
	}
	if a.NodeID().Verify(msg, sig[:63]) || (NodeID{}).Verify(msg, sig) {
		t.Fatal("short signature or zero key accepted")
	}
}

func TestLoadOrCreate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "dir", "identity.key")
	a, err := LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %04o, want 0600", st.Mode().Perm())
	}
	if st, _ := os.Stat(filepath.Dir(path)); st.Mode().Perm() != 0o700 {
		t.Errorf("created directory mode %04o, want 0700", st.Mode().Perm())
	}
	b, err := LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	if a.NodeID() != b.NodeID() {
		t.Fatal("second LoadOrCreate made a new identity")
	}
	// The file is standard PKCS #8 PEM.
	raw, _ := os.ReadFile(path)
	if !bytes.HasPrefix(raw, []byte("-----BEGIN PRIVATE KEY-----")) {
		t.Errorf("key file does not start with a PEM PRIVATE KEY header:\n%s", raw)
	}
	// No temporary files are left behind.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries, want only the key", len(ents))
	}
}

func TestLoadOrCreateRace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "identity.key")
	const n = 8
	ids := make([]NodeID, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			id, err := LoadOrCreate(path)
			errs[i] = err
			if err == nil {
				ids[i] = id.NodeID()
			}
		})
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("racer %d: %v", i, errs[i])
		}
		if ids[i] != ids[0] {
			t.Fatalf("racers ended with different identities")
		}
	}
}

func TestLoadRefuses(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.key")
	if _, err := LoadOrCreate(good); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(good)
	write := func(name string, b []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name string
		path string
		want error
	}{
		{"group readable", write("g.key", raw, 0o640), ErrInsecureFile},
		{"world readable", write("w.key", raw, 0o604), ErrInsecureFile},
		{"garbage", write("x.key", []byte("not a key"), 0o600), ErrBadKeyFile},
		{"truncated key", write("t.key", []byte("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"), 0o600), ErrBadKeyFile},
		{"ecdsa key", write("e.key", ecdsaPEM(t), 0o600), ErrBadKeyFile},
		{"too large", write("big.key", bytes.Repeat(raw, 100), 0o600), ErrBadKeyFile},
		{"directory", dir, ErrBadKeyFile},
		{"missing", filepath.Join(dir, "none.key"), fs.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(tt.path)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Load = %v, want %v", err, tt.want)
			}
		})
	}
	// LoadOrCreate must not replace an insecure existing key with a new one.
	p := write("keep.key", raw, 0o644)
	if _, err := LoadOrCreate(p); !errors.Is(err, ErrInsecureFile) {
		t.Fatalf("LoadOrCreate on insecure file = %v, want ErrInsecureFile", err)
	}
	if after, _ := os.ReadFile(p); !bytes.Equal(after, raw) {
		t.Fatal("LoadOrCreate changed an existing key file")
	}
}

func ecdsaPEM(t *testing.T) []byte {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func TestDefaultPath(t *testing.T) {
	t.Setenv("PEERLINK_IDENTITY", "/x/y.key")
	if p, err := DefaultPath(); err != nil || p != "/x/y.key" {
		t.Fatalf("DefaultPath = %q, %v", p, err)
	}
	t.Setenv("PEERLINK_IDENTITY", "")
	t.Setenv("XDG_CONFIG_HOME", "/cfg")
	if p, err := DefaultPath(); err != nil || p != "/cfg/peerlink/identity.key" {
		t.Fatalf("DefaultPath = %q, %v", p, err)
	}
}

func FuzzParseNodeID(f *testing.F) {
	id, _ := Generate()
	f.Add(id.NodeID().String())
	f.Add("")
	f.Add("pl")
	f.Add(strings.Repeat("a", TextLen))
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseNodeID(s)
		if err != nil {
			if !errors.Is(err, ErrMalformedNodeID) {
				t.Fatalf("error %v does not wrap ErrMalformedNodeID", err)
			}
			return
		}
		// Every accepted text is the one canonical spelling of its key.
		if n.String() != s {
			t.Fatalf("ParseNodeID(%q) round-trips to %q", s, n.String())
		}
	})
}
