// Package storetest is the conformance suite every store backend passes.
package storetest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/store"
)

// Factory returns two handles onto one fresh backend (for a network backend, two
// connections; for an in-process one, possibly the same value twice) whose Relays bucket
// has the TTL RelayTTL. The suite closes them.
type Factory func(t *testing.T) (a, b store.Store)

// RelayTTL is the Relays TTL a Factory must configure, short so expiry is observable.
const RelayTTL = 500 * time.Millisecond

// Run runs the suite.
func Run(t *testing.T, newStore Factory) {
	t.Run("KV", func(t *testing.T) { testKV(t, newStore) })
	t.Run("TTL", func(t *testing.T) { testTTL(t, newStore) })
	t.Run("Route", func(t *testing.T) { testRoute(t, newStore) })
	t.Run("Close", func(t *testing.T) { testClose(t, newStore) })
	t.Run("Update", func(t *testing.T) { testUpdate(t, newStore) })
	t.Run("ConcurrentUpdate", func(t *testing.T) { testConcurrentUpdate(t, newStore) })
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func testKV(t *testing.T, newStore Factory) {
	a, b := newStore(t)
	defer a.Close()
	defer b.Close()
	c := ctx(t)
	if _, err := a.Get(c, store.Profiles, "nobody"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get missing = %v, want ErrNotFound", err)
	}
	if err := a.Put(c, store.Profiles, "n1", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	// The other handle sees it: state is shared.
	if v, err := b.Get(c, store.Profiles, "n1"); err != nil || string(v) != "v1" {
		t.Fatalf("Get via second handle = %q, %v", v, err)
	}
	// Buckets are separate namespaces.
	if _, err := a.Get(c, store.Presence, "n1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get from another bucket = %v, want ErrNotFound", err)
	}
	if err := a.Put(c, store.Profiles, "n1", []byte("v2")); err != nil {
		t.Fatal(err)
	}
	if v, _ := a.Get(c, store.Profiles, "n1"); string(v) != "v2" {
		t.Fatalf("after overwrite Get = %q", v)
	}
	// Values are copies: changing a returned or stored slice changes nothing.
	buf := []byte("v3")
	if err := a.Put(c, store.Profiles, "n2", buf); err != nil {
		t.Fatal(err)
	}
	buf[0] = 'X'
	if v, _ := a.Get(c, store.Profiles, "n2"); string(v) != "v3" {
		t.Fatalf("stored value aliased the caller's slice: %q", v)
	}
	ents, err := a.List(c, store.Profiles)
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(ents, func(x, y store.Entry) int { return bytes.Compare([]byte(x.Key), []byte(y.Key)) })
	if len(ents) != 2 || ents[0].Key != "n1" || string(ents[0].Value) != "v2" || ents[1].Key != "n2" {
		t.Fatalf("List = %v", ents)
	}
	if err := a.Delete(c, store.Profiles, "n1"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get(c, store.Profiles, "n1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after Delete = %v", err)
	}
	if err := a.Delete(c, store.Profiles, "never"); err != nil {
		t.Fatalf("Delete missing = %v", err)
	}
	if ents, _ := a.List(c, store.Profiles); len(ents) != 1 {
		t.Fatalf("List after Delete = %v", ents)
	}
	if err := a.Put(c, "nope", "k", nil); !errors.Is(err, store.ErrUnknownBucket) {
		t.Fatalf("Put to unknown bucket = %v", err)
	}
}

func testTTL(t *testing.T, newStore Factory) {
	a, b := newStore(t)
	defer a.Close()
	defer b.Close()
	c := ctx(t)
	if err := a.Put(c, store.Relays, "r1", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Get(c, store.Relays, "r1"); err != nil {
		t.Fatalf("Get right after Put = %v", err)
	}
	// A heartbeat (Put again) extends the life; an entry left alone vanishes.
	if err := a.Put(c, store.Relays, "r2", []byte("y")); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	deadline := start.Add(RelayTTL + 3*time.Second)
	for {
		_, err := a.Get(c, store.Relays, "r1")
		if errors.Is(err, store.ErrNotFound) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("value still there %v after Put with TTL %v", time.Since(start), RelayTTL)
		}
		if err := a.Put(c, store.Relays, "r2", []byte("y")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(RelayTTL / 10)
	}
	if time.Since(start) < RelayTTL/2 {
		t.Fatalf("value expired after %v, TTL %v", time.Since(start), RelayTTL)
	}
	if _, err := a.Get(c, store.Relays, "r2"); err != nil {
		t.Fatalf("heartbeated value expired: %v", err)
	}
	ents, err := a.List(c, store.Relays)
	if err != nil || len(ents) != 1 || ents[0].Key != "r2" {
		t.Fatalf("List = %v, %v; want only r2", ents, err)
	}
}

func testRoute(t *testing.T, newStore Factory) {
	a, b := newStore(t)
	defer a.Close()
	defer b.Close()
	c := ctx(t)
	if err := b.Route(c, "n1", []byte("f")); !errors.Is(err, store.ErrNoRoute) {
		t.Fatalf("Route to unattached = %v, want ErrNoRoute", err)
	}
	if on, err := b.Online(c, "n1"); err != nil || on {
		t.Fatalf("Online unattached = %v, %v", on, err)
	}
	got := make(chan []byte, 10)
	detach, err := a.Attach("n1", func(f []byte) error {
		if string(f) == "refuse" {
			return errors.New("overloaded")
		}
		if string(f) == "gone" {
			return fmt.Errorf("conn closed: %w", store.ErrNoRoute)
		}
		got <- f
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, func() error {
		on, err := b.Online(c, "n1")
		if err == nil && !on {
			err = errors.New("not online")
		}
		return err
	})
	if err := b.Route(c, "n1", []byte("hello")); err != nil {
		t.Fatalf("Route = %v", err)
	}
	if f := <-got; string(f) != "hello" {
		t.Fatalf("handler got %q", f)
	}
	err = b.Route(c, "n1", []byte("refuse"))
	var re *store.RejectedError
	if !errors.As(err, &re) || re.Reason != "overloaded" || !errors.Is(err, store.ErrRejected) {
		t.Fatalf("Route refused = %v, want RejectedError{overloaded}", err)
	}
	if err := b.Route(c, "n1", []byte("gone")); !errors.Is(err, store.ErrNoRoute) {
		t.Fatalf("Route to a handler whose node just left = %v, want ErrNoRoute", err)
	}

	// Attaching again replaces the handler; the old detach then does nothing.
	var second atomic.Int32
	detach2, err := a.Attach("n1", func([]byte) error { second.Add(1); return nil })
	if err != nil {
		t.Fatal(err)
	}
	detach()
	if err := b.Route(c, "n1", []byte("x")); err != nil || second.Load() != 1 {
		t.Fatalf("Route after re-attach = %v (second handler calls %d)", err, second.Load())
	}
	detach2()
	eventually(t, func() error {
		if err := b.Route(c, "n1", []byte("x")); !errors.Is(err, store.ErrNoRoute) {
			return fmt.Errorf("route after detach = %v, want ErrNoRoute", err)
		}
		return nil
	})
	if len(got) != 0 {
		t.Fatalf("first handler got frames after being replaced")
	}
}

func testClose(t *testing.T, newStore Factory) {
	a, b := newStore(t)
	defer b.Close()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	c := ctx(t)
	if _, err := a.Attach("n", func([]byte) error { return nil }); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("Attach after Close = %v", err)
	}
	if _, err := a.Get(c, store.Profiles, "n"); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("Get after Close = %v", err)
	}
	if err := a.Route(c, "n", nil); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("Route after Close = %v", err)
	}
}

func eventually(t *testing.T, f func() error) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testUpdate(t *testing.T, newStore Factory) {
	a, b := newStore(t)
	defer a.Close()
	defer b.Close()
	c := ctx(t)
	if _, _, err := a.GetRev(c, store.Parties, "p"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetRev missing = %v, want ErrNotFound", err)
	}
	if err := a.Update(c, store.Parties, "p", []byte("v1"), 7); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("Update of a missing key at revision 7 = %v, want ErrConflict", err)
	}
	if err := a.Update(c, store.Parties, "p", []byte("v1"), 0); err != nil {
		t.Fatalf("create with revision 0 = %v", err)
	}
	if err := b.Update(c, store.Parties, "p", []byte("again"), 0); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("second create = %v, want ErrConflict", err)
	}
	v, rev1, err := b.GetRev(c, store.Parties, "p")
	if err != nil || string(v) != "v1" || rev1 == 0 {
		t.Fatalf("GetRev = %q, %d, %v", v, rev1, err)
	}
	if err := b.Update(c, store.Parties, "p", []byte("v2"), rev1); err != nil {
		t.Fatalf("Update at the current revision = %v", err)
	}
	// The first reader's revision is stale now: its write must not win.
	if err := a.Update(c, store.Parties, "p", []byte("lost"), rev1); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("Update at a stale revision = %v, want ErrConflict", err)
	}
	v, rev2, err := a.GetRev(c, store.Parties, "p")
	if err != nil || string(v) != "v2" || rev2 <= rev1 {
		t.Fatalf("after update GetRev = %q, %d, %v (first revision %d)", v, rev2, err, rev1)
	}
	// Get and Put see what Update wrote, and a Put moves the revision on.
	if v, err := a.Get(c, store.Parties, "p"); err != nil || string(v) != "v2" {
		t.Fatalf("Get after Update = %q, %v", v, err)
	}
	if err := a.Put(c, store.Parties, "p", []byte("v3")); err != nil {
		t.Fatal(err)
	}
	if err := a.Update(c, store.Parties, "p", []byte("lost"), rev2); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("Update after a Put = %v, want ErrConflict", err)
	}
	// A deleted key can be created again, and an old revision does not revive it.
	if err := a.Delete(c, store.Parties, "p"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.GetRev(c, store.Parties, "p"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetRev after Delete = %v", err)
	}
	if err := a.Update(c, store.Parties, "p", []byte("lost"), rev2); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("Update of a deleted key = %v, want ErrConflict", err)
	}
	if err := b.Update(c, store.Parties, "p", []byte("new"), 0); err != nil {
		t.Fatalf("create after Delete = %v", err)
	}
	// Party names are keys: every character they may hold works.
	const name = "0lan-party.2026_x.y"
	if err := a.Update(c, store.Parties, name, []byte("x"), 0); err != nil {
		t.Fatalf("create %q = %v", name, err)
	}
	if v, _, err := b.GetRev(c, store.Parties, name); err != nil || string(v) != "x" {
		t.Fatalf("GetRev %q = %q, %v", name, v, err)
	}
	if err := a.Update(c, "nope", "k", nil, 0); !errors.Is(err, store.ErrUnknownBucket) {
		t.Fatalf("Update in unknown bucket = %v", err)
	}
	if _, _, err := a.GetRev(c, "nope", "k"); !errors.Is(err, store.ErrUnknownBucket) {
		t.Fatalf("GetRev in unknown bucket = %v", err)
	}
}

// testConcurrentUpdate: updaters on both handles add themselves to one list with
// read-modify-Update loops; every one of them must be in the list at the end.
func testConcurrentUpdate(t *testing.T, newStore Factory) {
	a, b := newStore(t)
	defer a.Close()
	defer b.Close()
	c := ctx(t)
	const n = 16
	var wg sync.WaitGroup
	var conflicts atomic.Int64
	errs := make(chan error, n)
	for i := range n {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			for {
				v, rev, err := s.GetRev(c, store.Memberships, "list")
				var list []int
				switch {
				case errors.Is(err, store.ErrNotFound):
				case err != nil:
					errs <- err
					return
				default:
					if err := json.Unmarshal(v, &list); err != nil {
						errs <- err
						return
					}
				}
				list = append(list, i)
				nv, _ := json.Marshal(list)
				err = s.Update(c, store.Memberships, "list", nv, rev)
				if err == nil {
					return
				}
				if !errors.Is(err, store.ErrConflict) {
					errs <- err
					return
				}
				conflicts.Add(1)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	v, err := a.Get(c, store.Memberships, "list")
	if err != nil {
		t.Fatal(err)
	}
	var list []int
	if err := json.Unmarshal(v, &list); err != nil {
		t.Fatal(err)
	}
	slices.Sort(list)
	want := make([]int, n)
	for i := range want {
		want[i] = i
	}
	if !slices.Equal(list, want) {
		t.Fatalf("after %d concurrent updaters (%d conflicts retried) the list is %v", n, conflicts.Load(), list)
	}
	t.Logf("%d updaters, %d conflicts retried", n, conflicts.Load())
}
