// Package netlabtest builds kernel NAT labs for other packages' tests.
package netlabtest

import (
	"context"
	"os"
	"testing"
	"time"

	"peerlink/netlab"
)

// Need skips the test unless it runs as root, and fails it when it does but the lab's
// tools are missing: CI runs as root with them installed, so there a missing tool is a
// broken setup, not a reason to skip.
func Need(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kernel NAT lab needs root (run as root or via make test)")
	}
	if err := netlab.CheckRoot(); err != nil {
		t.Fatalf("running as root, but the lab cannot be built (make test installs its tools): %v", err)
	}
}

// Start builds a lab (after Need) and tears it down when the test ends, failing the
// test if anything of it is left behind.
func Start(t testing.TB, cfg netlab.Config) *netlab.Lab {
	t.Helper()
	Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := netlab.New(ctx, cfg)
	if err != nil {
		t.Fatalf("building the kernel lab: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("tearing down the kernel lab: %v", err)
		}
	})
	return l
}
