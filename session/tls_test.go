package session

import (
	"errors"
	"testing"

	"peerlink/identity"
)

func TestPeerKey(t *testing.T) {
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := certificate(id)
	if err != nil {
		t.Fatal(err)
	}
	der := cert.Certificate[0]
	flipped := append([]byte(nil), der...)
	flipped[len(flipped)-5] ^= 1 // in the signature
	tests := []struct {
		name  string
		certs [][]byte
		want  error
	}{
		{"own certificate", [][]byte{der}, nil},
		{"none", nil, ErrBadCertificate},
		{"two", [][]byte{der, der}, ErrBadCertificate},
		{"garbage", [][]byte{[]byte("not a certificate")}, ErrBadCertificate},
		{"bad signature", [][]byte{flipped}, ErrBadCertificate},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := peerKey(tt.certs)
			if !errors.Is(err, tt.want) || (err == nil) != (tt.want == nil) {
				t.Fatalf("err %v, want %v", err, tt.want)
			}
			if err == nil && got != id.NodeID() {
				t.Errorf("NodeID %s, want %s", got.Short(), id.NodeID().Short())
			}
		})
	}
	other, _ := identity.Generate()
	v := newVerifier(other.NodeID())
	if err := v.verify([][]byte{der}, nil); !errors.Is(err, ErrPeerMismatch) || !errors.Is(v.failure(), ErrPeerMismatch) {
		t.Errorf("verify against another NodeID: %v", err)
	}
	select {
	case <-v.fail:
	default:
		t.Error("the refusal was not signalled")
	}
}

// FuzzPeerKey: no certificate chain makes peerKey panic, and whatever it accepts is a
// self-signed ed25519 key whose NodeID it returns.
func FuzzPeerKey(f *testing.F) {
	id, _ := identity.Generate()
	cert, _ := certificate(id)
	f.Add(cert.Certificate[0])
	f.Add([]byte{0x30, 0x82, 0x01, 0x00})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, der []byte) {
		got, err := peerKey([][]byte{der})
		if err == nil && got.IsZero() {
			t.Error("accepted a certificate with a zero key")
		}
		if err != nil && !errors.Is(err, ErrBadCertificate) {
			t.Errorf("error %v does not wrap ErrBadCertificate", err)
		}
	})
}
