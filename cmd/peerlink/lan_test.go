package main

import (
	"bufio"
	"context"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
)

// TestLANOnly runs `peerlink agent --lan` and `peerlink connect --lan` on two hosts of
// one kernel-lab LAN with no rendezvous or STUN server at all: connect finds the agent
// over mDNS by its NodeID and connects directly.
func TestLANOnly(t *testing.T) {
	l := netlabtest.StartLAN(t, netlab.LANConfig{Hosts: 2})
	key := filepath.Join(t.TempDir(), "agent.key")
	node := nodeIDOf(t, key)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	agent := l.Hosts[0].Command(ctx, binary, "agent", "--lan", "--json", "--identity", key)
	agent.Env = cleanEnv()
	agentErr := &lockedBuffer{}
	agent.Stderr = agentErr
	out, err := agent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); agent.Wait() })
	ready := make(chan agentEvent, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev agentEvent
			if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.Event == "ready" {
				ready <- ev
			}
		}
	}()
	select {
	case ev := <-ready:
		if ev.Node != node {
			t.Fatalf("agent ready as %s, want %s", ev.Node, node)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("agent --lan not ready\n%s", agentErr)
	}

	cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer ccancel()
	cmd := l.Hosts[1].Command(cctx, binary, "connect", "--lan", "--json", "--identity", filepath.Join(t.TempDir(), "c.key"), node)
	cmd.Env = cleanEnv()
	stdout := &lockedBuffer{}
	stderr := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("connect --lan: %v\n%s\n%s\nagent:\n%s", err, stdout, stderr, agentErr)
	}
	var res connectJSON
	if err := json.Unmarshal([]byte(stdout.String()), &res); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, stdout)
	}
	if res.Method != "direct" || res.Peer != node || res.TimeToFirstByteMS == nil {
		t.Errorf("connect --lan: method %q peer %s first byte %v; want direct to %s with an echo\n%s", res.Method, res.Peer, res.TimeToFirstByteMS, node, stderr)
	}
}
