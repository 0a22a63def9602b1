package memstore

import (
	"context"
	"errors"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/store"
	"peerlink/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) (store.Store, store.Store) {
		s := New(Config{TTLs: store.TTLs{Relays: storetest.RelayTTL}})
		return s, s
	})
}

func TestExpiryAndSweep(t *testing.T) {
	fc := clock.NewFake(time.Unix(1e9, 0))
	s := New(Config{Clock: fc, TTLs: store.TTLs{Profiles: time.Minute}})
	ctx := context.Background()
	if err := s.Put(ctx, store.Profiles, "old", []byte("x")); err != nil {
		t.Fatal(err)
	}
	fc.Advance(59 * time.Second)
	if _, err := s.Get(ctx, store.Profiles, "old"); err != nil {
		t.Fatalf("Get before TTL = %v", err)
	}
	fc.Advance(time.Second)
	if _, err := s.Get(ctx, store.Profiles, "old"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get at TTL = %v, want ErrNotFound", err)
	}
	// Dead values are swept by later Puts, so memory stays bounded.
	for i := range sweepEvery {
		if err := s.Put(ctx, store.Presence, string(rune('a'+i%26))+string(rune(i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.RLock()
	_, still := s.kv[store.Profiles]["old"]
	s.mu.RUnlock()
	if still {
		t.Fatal("expired value not swept")
	}
}
