package netlabtest

import (
	"context"
	"testing"
	"time"

	"peerlink/netlab"
)

// StartLAN builds a LAN lab (after Need) and tears it down when the test ends, failing
// the test if anything of it is left behind.
func StartLAN(t testing.TB, cfg netlab.LANConfig) *netlab.LAN {
	t.Helper()
	Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := netlab.NewLAN(ctx, cfg)
	if err != nil {
		t.Fatalf("building the LAN lab: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("tearing down the LAN lab: %v", err)
		}
	})
	return l
}
