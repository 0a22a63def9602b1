package demo

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/netlab"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRounds(t *testing.T) {
	for n := range 10 {
		seen := map[[2]int]bool{}
		for _, r := range rounds(n) {
			inRound := map[int]bool{}
			for _, p := range r {
				if inRound[p[0]] || inRound[p[1]] {
					t.Errorf("n=%d: a peer is twice in round %v", n, r)
				}
				inRound[p[0]], inRound[p[1]] = true, true
				if seen[p] || p[0] >= p[1] {
					t.Errorf("n=%d: pair %v repeated or unordered", n, p)
				}
				seen[p] = true
			}
		}
		if want := n * (n - 1) / 2; len(seen) != want {
			t.Errorf("n=%d: %d pairs, want %d", n, len(seen), want)
		}
	}
}

// TestRun runs a small demo: a relay-only pair, punched pairs (birthday probing through
// the carrier-grade NAT, port prediction) and direct ones, each as the plan predicts.
func TestRun(t *testing.T) {
	kinds := []netlab.Kind{netlab.KindFullCone, netlab.KindSymmetric, netlab.KindSymmetric, netlab.KindCGNAT, netlab.KindRestrictedCone}
	var lines []string
	rep, err := Run(context.Background(), Config{Kinds: kinds, Seed: 7, Progress: func(s string) { lines = append(lines, s) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d connections in %v\n%s", len(rep.Pairs), time.Duration(rep.Elapsed), strings.Join(lines, "\n"))
	if !rep.OK || rep.Failures() != 0 {
		t.Errorf("report not OK: %d failures", rep.Failures())
	}
	if len(rep.Peers) != len(kinds) || len(rep.Pairs) != len(kinds)*(len(kinds)-1) {
		t.Fatalf("%d peers, %d pairs", len(rep.Peers), len(rep.Pairs))
	}
	if rep.Peers[2].Name != "symmetric-2" {
		t.Errorf("a repeated kind is not numbered: %q", rep.Peers[2].Name)
	}
	methods := map[string]int{}
	for _, p := range rep.Pairs {
		methods[p.Method]++
		if p.Method != p.Predicted {
			t.Errorf("%s → %s: %s, predicted %s", p.Initiator, p.Responder, p.Method, p.Predicted)
		}
	}
	// full-cone ↔ everyone: 8 direct; symmetric ↔ symmetric: 2 relayed; the rest punched.
	if methods["direct"] != 8 || methods["relayed"] != 2 || methods["punched"] != 10 {
		t.Errorf("methods %v, want 8 direct, 2 relayed, 10 punched", methods)
	}
	// The report survives a JSON round trip (what peerlink demo --json prints).
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Elapsed != rep.Elapsed.truncMicro() || len(back.Pairs) != len(rep.Pairs) {
		t.Errorf("round trip: elapsed %v → %v", rep.Elapsed, back.Elapsed)
	}
}

func (d Duration) truncMicro() Duration { return Duration(time.Duration(d).Truncate(time.Microsecond)) }

func TestRunRejects(t *testing.T) {
	for _, k := range []netlab.Kind{netlab.KindUDPBlocked, netlab.KindUnknown, netlab.Kind(200)} {
		_, err := Run(context.Background(), Config{Kinds: []netlab.Kind{netlab.KindNone, k}})
		if !errors.Is(err, ErrUnsupportedKind) {
			t.Errorf("kind %v: %v, want ErrUnsupportedKind", k, err)
		}
	}
}

func TestRunCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rep, err := Run(ctx, Config{Kinds: []netlab.Kind{netlab.KindNone, netlab.KindFullCone}})
	if !errors.Is(err, context.Canceled) || rep == nil || rep.OK {
		t.Errorf("cancelled run: %v, report %+v", err, rep)
	}
}
