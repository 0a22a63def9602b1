// Package signaltest runs rendezvous servers on loopback for tests, with clients and,
// when asked, a self-signed certificate.
package signaltest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/signal"
)

// Server is a running rendezvous server.
type Server struct {
	*signal.Server
	// URL is the server's ws:// (or wss://) URL.
	URL string
	// Addr is the listening address.
	Addr string
	// TLS is the client configuration trusting the server's certificate, for wss.
	TLS *tls.Config
}

// Start runs a server with cfg on a random loopback port until the test ends. When
// withTLS is true it makes a self-signed certificate for 127.0.0.1 and serves wss.
func Start(t testing.TB, cfg signal.Config, withTLS bool) *Server {
	t.Helper()
	s := &Server{}
	scheme := "ws"
	if withTLS {
		var pool *x509.CertPool
		cfg.CertFile, cfg.KeyFile, pool = Certificate(t)
		s.TLS = &tls.Config{RootCAs: pool}
		scheme = "wss"
	}
	srv, err := signal.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("signaltest: Serve: %v", err)
		}
		srv.Close()
	})
	s.Server, s.Addr = srv, ln.Addr().String()
	s.URL = scheme + "://" + s.Addr + "/"
	return s
}

// Dial connects a client with a new identity; it is closed when the test ends.
func (s *Server) Dial(t testing.TB, opts *signal.Options) *signal.Client {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return s.DialAs(t, id, opts)
}

// DialAs connects a client as id; it is closed when the test ends.
func (s *Server) DialAs(t testing.TB, id *identity.Identity, opts *signal.Options) *signal.Client {
	t.Helper()
	var o signal.Options
	if opts != nil {
		o = *opts
	}
	if o.TLSConfig == nil {
		o.TLSConfig = s.TLS
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := signal.Dial(ctx, s.URL, id, &o)
	if err != nil {
		t.Fatalf("signaltest: dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Certificate writes a self-signed certificate for 127.0.0.1 and localhost to the test's
// temporary directory and returns the files and a pool trusting it.
func Certificate(t testing.TB) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "peerlink test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}
