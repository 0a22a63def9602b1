package benchrun

import (
	"context"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/netlab/netlabtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestDetectLab: the measurement runs in a real kernel lab, every detection agrees with
// the lab's NAT (DetectLab checks), and it returns as many detections as asked.
func TestDetectLab(t *testing.T) {
	netlabtest.Need(t)
	res, err := DetectLab(context.Background(), 10*time.Millisecond, 2)
	if err != nil {
		t.Fatal(err)
	}
	if res.First <= 0 || len(res.Fresh) != 2 || res.RTT <= 0 {
		t.Fatalf("DetectLab = %+v", res)
	}
	for _, d := range res.Fresh {
		if d <= 0 {
			t.Fatalf("a detection took %v", d)
		}
	}
	t.Logf("first %v, then %v, RTT %v", res.First, res.Fresh, res.RTT)
}
