package relayreg

import (
	"context"
	"errors"
	"testing"
	"time"

	"peerlink/relay"
	"peerlink/relay/relaytest"
	"peerlink/store"
	"peerlink/store/memstore"
)

// TestRegistrarWithRelay runs a real relay whose Registrar announces to a Registry: the
// registration carries the relay's real endpoints and capacity, heartbeats carry its
// load, a draining relay is passed by, and a lost registration comes back.
func TestRegistrarWithRelay(t *testing.T) {
	st := memstore.New(memstore.Config{TTLs: store.TTLs{Relays: 30 * time.Second}})
	reg := NewRegistry(st, nil)
	id := newID(t)
	rl := relaytest.Start(t, relay.Config{MaxSessions: 10, HeartbeatInterval: 50 * time.Millisecond,
		Registrar: &Registrar{Announcer: reg, NodeID: id}})

	// await polls the registry until cond holds for the relay's entry.
	await := func(what string, cond func(Info) bool) Info {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			list, err := reg.ListRelays(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, i := range list {
				if i.NodeID == id && cond(i) {
					return i
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("registry never showed %s: %+v", what, list)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	info := await("the relay", func(Info) bool { return true })
	want := map[Endpoint]bool{{UDP, rl.UDP.String()}: true, {TCP, rl.TCP.String()}: true}
	if len(info.Endpoints) != len(want) {
		t.Errorf("endpoints %v, want %v", info.Endpoints, want)
	}
	for _, e := range info.Endpoints {
		if !want[e] {
			t.Errorf("endpoint %v is not one of the relay's %v", e, want)
		}
	}
	if info.Capacity != 10 {
		t.Errorf("capacity %d, want the relay's MaxSessions 10", info.Capacity)
	}

	// A session shows as load; the finder picks the relay.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := relay.Dial(ctx, relay.ClientConfig{Server: rl.UDP.String(), Username: relaytest.User, Password: relaytest.Password})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	await("load 1", func(i Info) bool { return i.Load == 1 })
	f := &Finder{Source: reg}
	if ch, err := f.FindRelay(ctx, newID(t)); err != nil || ch.NodeID != id || ch.Endpoint.Transport != UDP {
		t.Errorf("FindRelay = %+v, %v; want the relay over udp", ch, err)
	}

	// Draining: announced full, so no longer chosen.
	rl.Disable()
	await("a full relay", Info.Full)
	if ch, err := f.FindRelay(ctx, newID(t)); !errors.Is(err, ErrNoRelay) {
		t.Errorf("FindRelay while the relay drains = %+v, %v; want ErrNoRelay", ch, err)
	}
	rl.Enable()
	await("the relay taking sessions again", func(i Info) bool { return !i.Full() })

	// A registry that lost the relay has it back within a heartbeat.
	if err := reg.Unregister(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	await("the relay again after it was lost", func(Info) bool { return true })
}
