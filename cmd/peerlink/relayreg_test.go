package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/relayreg"
	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/stun/stuntest"
)

// TestRelayRegistersWithRendezvous runs `peerlink relay --rendezvous`: the relay shows up
// in the rendezvous server's registry with its real endpoint, and an agent and a
// connecting node given no --relay find it there and relay through it with
// credentials from the rendezvous server.
func TestRelayRegistersWithRendezvous(t *testing.T) {
	const secret = "registry-test-secret"
	sig := signaltest.Start(t, signal.Config{TURNSecret: secret}, false)
	st := stuntest.Start(t, stuntest.Options{RFC5780: true})
	stunAddr := st.UDPAddr(0).String()

	relayKey := filepath.Join(t.TempDir(), "relay.key")
	cmd := exec.Command(binary, "relay", "--listen", "127.0.0.1:0", "--no-tcp", "--secret", secret, "--allow-loopback-peers",
		"--rendezvous", sig.URL, "--identity", relayKey)
	cmd.Env = cleanEnv()
	relayOut := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = relayOut, relayOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	relayNode := nodeIDOf(t, relayKey)

	// The registry lists the relay under its own NodeID, with the port it listens on.
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	watcher := sig.DialAs(t, id, nil)
	var info relayreg.Info
	deadline := time.Now().Add(10 * time.Second)
	for info.NodeID.IsZero() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		list, err := watcher.ListRelays(ctx)
		cancel()
		if err == nil && len(list) > 0 {
			info = list[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the relay never registered (err %v)\nrelay output:\n%s", err, relayOut)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if info.NodeID.String() != relayNode {
		t.Errorf("registered as %v, want the relay's identity %s", info.NodeID, relayNode)
	}
	if len(info.Endpoints) != 1 || info.Endpoints[0].Transport != relayreg.UDP || !strings.Contains(relayOut.String(), "udp "+info.Endpoints[0].Addr) {
		t.Errorf("endpoints %v, want the one udp address the relay printed:\n%s", info.Endpoints, relayOut)
	}

	agent := startAgent(t, "--server", sig.URL, "--stun", stunAddr)
	hasRelayed := false
	for _, c := range agent.ready.Candidates {
		hasRelayed = hasRelayed || strings.HasPrefix(c, "relayed ")
	}
	if !hasRelayed {
		t.Errorf("agent with no --relay has no relayed candidate: %v\n%s", agent.ready.Candidates, agent.stderr)
	}
	stdout, stderr, code := runEnv(t, nil, "connect", "--identity", filepath.Join(t.TempDir(), "c.key"), "--server", sig.URL, "--stun", stunAddr,
		"--no-direct", "--json", agent.node)
	if code != 0 {
		t.Fatalf("connect --no-direct without --relay: exit %d\n%s\n%s", code, stdout, stderr)
	}
	var out connectJSON
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, stdout)
	}
	if out.Method != "relayed" {
		t.Errorf("method %q, want relayed through the registered relay\n%s", out.Method, stderr)
	}
	if !strings.Contains(stderr, "registered with the rendezvous server") {
		t.Errorf("progress does not say the relay came from the registry:\n%s", stderr)
	}
}

// lockedBuffer collects a process's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
