package natcache_test

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/nat"
	"peerlink/natcache"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestSignalClientFetcher: a cache fed by a real rendezvous client loads what a peer
// published, and reports a node that published nothing.
func TestSignalClientFetcher(t *testing.T) {
	srv := signaltest.Start(t, signal.Config{}, false)
	peer, me := srv.Dial(t, nil), srv.Dial(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p := nat.Profile{Mapping: nat.MappingPD, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD,
		PublicIP: netip.MustParseAddr("198.51.100.9"), PublicPort: 61000, Confidence: nat.ConfidenceHigh}
	if err := peer.Publish(ctx, signal.NewConnectionInfo(p, netip.MustParseAddrPort("10.0.0.2:5000"), nil)); err != nil {
		t.Fatal(err)
	}
	c := natcache.New(natcache.Config{Fetcher: me})
	defer c.Close()
	got, err := c.Fetch(ctx, peer.NodeID())
	if err != nil || !reflect.DeepEqual(got, p) {
		t.Fatalf("Fetch = %+v, %v; want %+v", got, err, p)
	}
	if cached, stale, err := c.Get(peer.NodeID()); err != nil || stale || !reflect.DeepEqual(cached, p) {
		t.Fatalf("Get after Fetch = %+v stale=%v %v", cached, stale, err)
	}
	stranger, _ := identity.Generate()
	if _, err := c.Fetch(ctx, stranger.NodeID()); !errors.Is(err, signal.ErrNotFound) {
		t.Fatalf("Fetch of unknown node = %v, want signal.ErrNotFound", err)
	}
}
