package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"peerlink/internal/demo"
)

// TestDemo runs peerlink demo as a user would and checks its promise: every peer's NAT
// profiled as built, every ordered pair connected by the method the plan predicts.
func TestDemo(t *testing.T) {
	start := time.Now()
	stdout, stderr, code := runEnv(t, nil, "demo", "--json")
	elapsed := time.Since(start)
	t.Logf("peerlink demo --json took %v", elapsed)
	if code != 0 {
		t.Errorf("exit %d\n%s", code, stderr)
	}
	var rep demo.Report
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("output is not the JSON report: %v\n%s", err, stdout)
	}
	kinds := demo.DefaultKinds()
	if len(rep.Peers) != len(kinds) || len(rep.Pairs) != len(kinds)*(len(kinds)-1) {
		t.Fatalf("%d peers and %d pairs, want %d and %d", len(rep.Peers), len(rep.Pairs), len(kinds), len(kinds)*(len(kinds)-1))
	}
	for _, p := range rep.Peers {
		if !p.Matches || p.Node == "" {
			t.Errorf("peer %s: built as %s, detected %s (node %q, error %q)", p.Name, p.Expected, p.Detected, p.Node, p.Error)
		}
	}
	methods := map[string]int{}
	seen := map[[2]string]bool{}
	for _, p := range rep.Pairs {
		seen[[2]string{p.Initiator, p.Responder}] = true
		methods[p.Method]++
		if !p.Connected || p.Method != p.Predicted || !p.OK {
			t.Errorf("%s → %s: connected %v, method %q, plan %s predicts %q: %s", p.Initiator, p.Responder, p.Connected, p.Method, p.Plan, p.Predicted, p.Error)
		}
		if p.Connected && p.FirstPath == nil {
			t.Errorf("%s → %s: no first-path time", p.Initiator, p.Responder)
		}
		if (p.ToDirect != nil) != (p.Method == "direct" || p.Method == "punched") {
			t.Errorf("%s → %s: method %s but time to direct %v", p.Initiator, p.Responder, p.Method, p.ToDirect)
		}
	}
	if len(seen) != len(rep.Pairs) {
		t.Errorf("pairs repeat: %d distinct of %d", len(seen), len(rep.Pairs))
	}
	// The default peers show every method.
	for _, m := range []string{"direct", "punched", "relayed"} {
		if methods[m] == 0 {
			t.Errorf("no pair connected %s: %v", m, methods)
		}
	}
	if !rep.OK {
		t.Errorf("report not OK")
	}
	if elapsed > 60*time.Second {
		t.Errorf("demo took %v; it should take well under 30s", elapsed)
	}
}

func TestDemoReadable(t *testing.T) {
	stdout, stderr, code := runEnv(t, nil, "demo", "-q", "--kinds", "full-cone,symmetric,symmetric")
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
	}
	if stderr != "" {
		t.Errorf("-q still printed progress: %s", stderr)
	}
	for _, want := range []string{"every pair connected as predicted", "symmetric-2", "full cone NAT", "R ", "D ", "direct(b) → relay"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("report lacks %q:\n%s", want, stdout)
		}
	}
}

func TestDemoUsage(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{[]string{"demo", "-h"}, 0, "Examples:"},
		{[]string{"demo", "--kinds", "moon"}, 2, "unknown NAT kind"},
		{[]string{"demo", "--kinds", "udp-blocked,none"}, 2, "TURN over TCP"},
		{[]string{"demo", "--kinds", "none"}, 2, "at least two peers"},
		{[]string{"demo", "--timeout", "0s"}, 2, "must be positive"},
		{[]string{"demo", "extra"}, 2, `unexpected argument "extra"`},
	}
	for _, tt := range tests {
		stdout, stderr, code := runEnv(t, nil, tt.args...)
		if code != tt.code || !strings.Contains(stdout+stderr, tt.contains) {
			t.Errorf("peerlink %v: exit %d, want %d; output %q does not contain %q", tt.args, code, tt.code, stdout+stderr, tt.contains)
		}
	}
}
