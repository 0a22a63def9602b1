package main

import (
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

// TestAgentHTTP runs `peerlink agent --http`: its status API names the node and its
// profile, and after a connection the API and /metrics count it by method and count the
// datagrams echoed.
func TestAgentHTTP(t *testing.T) {
	server, stunAddr := servers(t)
	agent := startAgent(t, "--server", server, "--stun", stunAddr, "--http", "127.0.0.1:0")
	if !strings.HasPrefix(agent.ready.HTTP, "http://127.0.0.1:") {
		t.Fatalf("ready event has no HTTP address: %+v", agent.ready)
	}
	get := func(path string) string {
		t.Helper()
		resp, err := http.Get(agent.ready.HTTP + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s\n%s", path, resp.Status, b)
		}
		return string(b)
	}
	var st agentStatus
	if err := json.Unmarshal([]byte(get("api/status")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Node != agent.node || st.Profile == nil || st.Server != server || st.Accepted != 0 || len(st.Connections) != 0 {
		t.Errorf("status before any connection: %+v", st)
	}

	key := filepath.Join(t.TempDir(), "c.key")
	self := nodeIDOf(t, key)
	stdout, stderr, code := runEnv(t, nil, "connect", "--identity", key, "--server", server, "--stun", stunAddr, "--json", agent.node)
	if code != 0 {
		t.Fatalf("connect: exit %d\n%s\n%s", code, stdout, stderr)
	}
	agent.next(t, "closed", self)
	if err := json.Unmarshal([]byte(get("api/status")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Accepted != 1 || len(st.Connections) != 0 {
		t.Errorf("status after one closed connection: accepted %d, open %v", st.Accepted, st.Connections)
	}
	metrics := get("metrics")
	for _, want := range []string{`peerlink_agent_connections_accepted_total{method="direct"} 1`, "peerlink_agent_datagrams_echoed_total "} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, metrics)
		}
	}
	if strings.Contains(metrics, "peerlink_agent_datagrams_echoed_total 0") {
		t.Errorf("no datagram counted as echoed:\n%s", metrics)
	}
}
