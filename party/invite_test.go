package party

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"

	"peerlink/identity"
)

func mustID(t testing.TB) *identity.Identity {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestInvite(t *testing.T) {
	alice, mallory := mustID(t), mustID(t)
	tok, err := NewInvite(alice, "lan", time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	if len(tok) > MaxInviteLen || strings.ContainsAny(tok, " \n\t+/=") {
		t.Fatalf("token %q is not one short URL-safe line", tok)
	}
	inv, err := ParseInvite("  " + tok + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if inv.Party != "lan" || inv.Inviter != alice.NodeID() || !inv.Expires.Equal(t0.Add(time.Hour)) {
		t.Fatalf("parsed %+v", inv)
	}
	if err := inv.Verify(t0.Add(59 * time.Minute)); err != nil {
		t.Fatalf("Verify before expiry = %v", err)
	}
	err = inv.Verify(t0.Add(time.Hour + 3*time.Minute))
	if !errors.Is(err, ErrInviteExpired) || !strings.Contains(err.Error(), "expired 3m0s ago") || !strings.Contains(err.Error(), "2026-12-01T13:00:00Z") || !strings.Contains(err.Error(), "lan") {
		t.Fatalf("Verify after expiry = %v", err)
	}
	tok2, _ := NewInvite(alice, "lan", time.Hour, t0)
	if tok2 == tok {
		t.Fatal("two invites are the same token")
	}

	raw, _ := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(tok, InvitePrefix))
	reencode := func(b []byte) string { return InvitePrefix + base64.RawURLEncoding.EncodeToString(b) }
	for _, tc := range []struct {
		name   string
		mutate func(b []byte) []byte
	}{
		{"party renamed", func(b []byte) []byte { b[1] = 'x'; return b }},
		{"expiry extended", func(b []byte) []byte { b[1+3+32+7]++; return b }},
		{"inviter swapped", func(b []byte) []byte { m := mallory.NodeID(); copy(b[4:36], m[:]); return b }},
		{"signature flipped", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }},
		{"nonce changed", func(b []byte) []byte { b[1+3+32+8] ^= 1; return b }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.mutate(append([]byte(nil), raw...))
			inv, err := ParseInvite(reencode(b))
			if err != nil {
				t.Fatal(err)
			}
			if err := inv.Verify(t0); !errors.Is(err, ErrInviteForged) {
				t.Fatalf("Verify = %v, want ErrInviteForged", err)
			}
		})
	}
	for _, bad := range []string{
		"", "hello", InvitePrefix, InvitePrefix + "!!!!", tok[:len(tok)-5], tok + "AAAA",
		strings.Replace(tok, InvitePrefix, "plinv2_", 1), InvitePrefix + strings.Repeat("A", 400),
		reencode(append([]byte{3, 'L', 'A', 'N'}, raw[4:]...)),
	} {
		if _, err := ParseInvite(bad); !errors.Is(err, ErrInviteMalformed) {
			t.Errorf("ParseInvite(%.40q) = %v, want ErrInviteMalformed", bad, err)
		}
	}
	if _, err := NewInvite(alice, "Bad", time.Hour, t0); !errors.Is(err, ErrBadName) {
		t.Fatalf("NewInvite bad name = %v", err)
	}
	if _, err := NewInvite(alice, "lan", 0, t0); err == nil {
		t.Fatal("NewInvite with no lifetime succeeded")
	}
}

func FuzzParseInvite(f *testing.F) {
	id, err := identity.Generate()
	if err != nil {
		f.Fatal(err)
	}
	tok, _ := NewInvite(id, "lan-party", time.Hour, t0)
	f.Add(tok)
	f.Add(tok[:len(tok)-1])
	f.Add(InvitePrefix + "AA")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		inv, err := ParseInvite(s)
		if err != nil {
			if !errors.Is(err, ErrInviteMalformed) {
				t.Fatalf("ParseInvite error %v is not ErrInviteMalformed", err)
			}
			return
		}
		if err := ValidName(inv.Party); err != nil {
			t.Fatalf("parsed invite with bad party name: %v", err)
		}
		err = inv.Verify(t0)
		if err != nil && !errors.Is(err, ErrInviteForged) && !errors.Is(err, ErrInviteExpired) {
			t.Fatalf("Verify = %v", err)
		}
	})
}
