package identity

import (
	"bytes"
	"testing"
)

func TestSharedKey(t *testing.T) {
	a, _ := Generate()
	b, _ := Generate()
	c, _ := Generate()
	ab, err := a.SharedKey(b.NodeID(), []byte("session-1"), 32)
	if err != nil {
		t.Fatal(err)
	}
	ba, err := b.SharedKey(a.NodeID(), []byte("session-1"), 32)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ab, ba) || len(ab) != 32 {
		t.Fatalf("the two sides disagree: %x vs %x", ab, ba)
	}
	other, _ := a.SharedKey(b.NodeID(), []byte("session-2"), 32)
	ac, _ := a.SharedKey(c.NodeID(), []byte("session-1"), 32)
	if bytes.Equal(ab, other) || bytes.Equal(ab, ac) {
		t.Error("keys for another session or another peer are equal")
	}
	// The identity point is a valid encoding of a low-order key: refused.
	var low NodeID
	low[0] = 1
	if _, err := a.SharedKey(low, nil, 16); err == nil {
		t.Error("low-order peer key accepted")
	}
}
