package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/relay"
	"peerlink/relay/relaytest"
	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/stun/stuntest"
)

// env runs the binary with the test's own PEERLINK_* settings only (none inherited),
// and returns stdout, stderr and the exit code.
func runEnv(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binary, args...)
	cmd.Env = append(cleanEnv(), env...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &ee):
		return stdout.String(), stderr.String(), ee.ExitCode()
	}
	t.Fatalf("running peerlink %v: %v", args, err)
	return "", "", -1
}

func cleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PEERLINK_") {
			out = append(out, kv)
		}
	}
	return out
}

// testAgent is a `peerlink agent --json` child process.
type testAgent struct {
	cmd    *exec.Cmd
	node   string
	ready  agentEvent
	events chan agentEvent // after "ready"
	stderr *bytes.Buffer
	done   chan struct{} // closed when the process has exited
	err    error         // Wait's result, once done
}

// startAgent runs peerlink agent with its own identity and waits until it is ready.
func startAgent(t *testing.T, args ...string) *testAgent {
	t.Helper()
	args = append([]string{"agent", "--json", "--identity", filepath.Join(t.TempDir(), "agent.key")}, args...)
	cmd := exec.Command(binary, args...)
	cmd.Env = cleanEnv()
	a := &testAgent{cmd: cmd, events: make(chan agentEvent, 64), stderr: &bytes.Buffer{}, done: make(chan struct{})}
	cmd.Stderr = a.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan agentEvent, 1)
	go func() {
		sc := bufio.NewScanner(out)
		first := true
		for sc.Scan() {
			var ev agentEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				t.Errorf("agent printed a line that is not JSON: %q", sc.Text())
				continue
			}
			if first {
				ready <- ev
				first = false
				continue
			}
			select {
			case a.events <- ev:
			default:
			}
		}
		a.err = cmd.Wait()
		close(a.done)
	}()
	t.Cleanup(func() {
		select {
		case <-a.done:
		default:
			a.cmd.Process.Kill() // the process this test started, by its PID
			<-a.done
		}
	})
	select {
	case a.ready = <-ready:
	case <-a.done:
		t.Fatalf("agent exited before it was ready: %v\n%s", a.err, a.stderr)
	case <-time.After(15 * time.Second):
		t.Fatalf("agent not ready within 15s\n%s", a.stderr)
	}
	if a.ready.Event != "ready" {
		t.Fatalf("agent's first line is %+v, want the ready event", a.ready)
	}
	a.node = a.ready.Node
	return a
}

// next returns the agent's next event of kind ev for peer.
func (a *testAgent) next(t *testing.T, ev, peer string) agentEvent {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e := <-a.events:
			if e.Event == ev && e.Peer == peer {
				return e
			}
		case <-timeout:
			t.Fatalf("agent logged no %q event for %s\n%s", ev, peer, a.stderr)
		}
	}
}

// servers starts the rendezvous and an RFC 5780 STUN server on loopback.
func servers(t *testing.T) (rendezvous, stunAddr string) {
	sig := signaltest.Start(t, signal.Config{}, false)
	st := stuntest.Start(t, stuntest.Options{RFC5780: true})
	return sig.URL, st.UDPAddr(0).String()
}

func nodeIDOf(t *testing.T, keyFile string) string {
	t.Helper()
	stdout, stderr, code := runEnv(t, nil, "id", "--identity", keyFile)
	if code != 0 {
		t.Fatalf("peerlink id: exit %d: %s", code, stderr)
	}
	return strings.TrimSpace(stdout)
}

func TestConnectToAgent(t *testing.T) {
	server, stunAddr := servers(t)
	rl := relaytest.Start(t, relay.Config{})
	agent := startAgent(t, "--server", server, "--stun", stunAddr, "--relay", rl.UDP.String(), "--relay-user", relaytest.User, "--relay-pass", relaytest.Password)
	if _, err := identity.ParseNodeID(agent.node); err != nil {
		t.Fatalf("agent's ready event has no NodeID: %+v", agent.ready)
	}
	if agent.ready.Profile == nil || agent.ready.Profile.Mapping.String() != "ei" {
		t.Errorf("agent's profile on loopback: %+v, want endpoint-independent mapping", agent.ready.Profile)
	}
	kinds := map[string]bool{}
	for _, c := range agent.ready.Candidates {
		kinds[strings.Fields(c)[0]] = true
	}
	if !kinds["srflx"] || !kinds["relayed"] {
		t.Errorf("agent's candidates %v lack srflx or relayed", agent.ready.Candidates)
	}

	tests := []struct {
		name   string
		args   []string
		env    []string
		method string
		direct bool // time_to_direct_ms is set
	}{
		{"direct, flags", []string{"--server", server, "--stun", stunAddr}, nil, "direct", true},
		{"direct, environment", nil, []string{"PEERLINK_SERVER=" + server, "PEERLINK_STUN=" + stunAddr}, "direct", true},
		{"relayed only", []string{"--server", server, "--stun", stunAddr, "--no-direct", "--relay", rl.UDP.String()},
			[]string{"PEERLINK_RELAY_USER=" + relaytest.User, "PEERLINK_RELAY_PASS=" + relaytest.Password}, "relayed", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := filepath.Join(t.TempDir(), "id.key")
			args := append(append([]string{"connect", "--identity", key}, tt.args...), agent.node, "--json") // flags after the node too
			start := time.Now()
			stdout, stderr, code := runEnv(t, tt.env, args...)
			if code != 0 {
				t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
			var out connectJSON
			if err := json.Unmarshal([]byte(stdout), &out); err != nil {
				t.Fatalf("output is not JSON: %v\n%s", err, stdout)
			}
			self := nodeIDOf(t, key)
			if out.Node != self || out.Peer != agent.node {
				t.Errorf("node %q peer %q, want %q and %q", out.Node, out.Peer, self, agent.node)
			}
			if out.Method != tt.method {
				t.Errorf("method %q, want %q\n%s", out.Method, tt.method, stderr)
			}
			// Both ends see each other's reflexive address as reachable: the plan dials.
			if out.Technique != "direct" {
				t.Errorf("technique %q, want direct", out.Technique)
			}
			if out.Profile == nil || !out.Profile.PublicIP.IsLoopback() {
				t.Errorf("profile %+v, want one with a loopback public address", out.Profile)
			}
			elapsed := float64(time.Since(start).Milliseconds())
			switch ttfb := out.TimeToFirstByteMS; {
			case ttfb == nil || out.TimeToFirstPathMS == nil:
				t.Errorf("time_to_first_byte_ms or time_to_first_path_ms missing: %s", stdout)
			case *ttfb <= 0 || *ttfb < *out.TimeToFirstPathMS || *ttfb > elapsed:
				t.Errorf("time to first byte %v ms, first path %v ms, whole run %v ms: inconsistent", *ttfb, *out.TimeToFirstPathMS, elapsed)
			}
			if (out.TimeToDirectMS != nil) != tt.direct {
				t.Errorf("time_to_direct_ms = %v, want set: %v", out.TimeToDirectMS, tt.direct)
			}
			if !tt.direct && !strings.Contains(stdout, `"time_to_direct_ms": null`) {
				t.Errorf("a relayed connection's time_to_direct_ms is not null: %s", stdout)
			}
			// The agent saw the same connection and echoed datagrams back.
			if ev := agent.next(t, "connected", self); ev.Method != tt.method {
				t.Errorf("agent says %q, want %q", ev.Method, tt.method)
			}
			if ev := agent.next(t, "closed", self); ev.Datagrams == nil || *ev.Datagrams < 1 {
				t.Errorf("agent closed the connection having echoed %v datagrams", ev.Datagrams)
			}
			for _, want := range []string{"profile:", "candidates:", "plan:", "path up: ", "first byte:"} {
				if !strings.Contains(stderr, want) {
					t.Errorf("progress lacks %q:\n%s", want, stderr)
				}
			}
		})
	}

	t.Run("human summary", func(t *testing.T) {
		stdout, stderr, code := runEnv(t, nil, "connect", "--identity", filepath.Join(t.TempDir(), "id.key"), "--server", server, "--stun", stunAddr, agent.node)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		for _, want := range []string{"connected to " + agent.node + ": direct (technique direct)", "first byte:", "direct path:", "ms"} {
			if !strings.Contains(stdout, want) {
				t.Errorf("summary lacks %q:\n%s", want, stdout)
			}
		}
	})

	t.Run("many at once", func(t *testing.T) {
		const n = 3
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			key := filepath.Join(t.TempDir(), fmt.Sprintf("id%d.key", i))
			wg.Go(func() {
				stdout, stderr, code := runEnv(t, nil, "connect", "--json", "--identity", key, "--server", server, "--stun", stunAddr, agent.node)
				var out connectJSON
				// A direct path, made by dialling or by punching: with three connects
				// and their NAT profiling at once on a loaded machine, the agent's
				// filtering is now and then profiled restricted (a CHANGE-REQUEST
				// answer came late), and both sides then punch (over IPv6 too) rather
				// than dial. The single connect above asserts "direct".
				if code != 0 || json.Unmarshal([]byte(stdout), &out) != nil || (out.Method != "direct" && out.Method != "punched") {
					errs <- fmt.Errorf("connect %d: exit %d, %s\n%s", i, code, stdout, stderr)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("relay that fails is named, and the rendezvous server relays", func(t *testing.T) {
		// A TCP port nothing listens on: the relay allocation is refused at once.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := ln.Addr().String()
		ln.Close()
		stdout, stderr, code := runEnv(t, nil, "connect", "--json", "--identity", filepath.Join(t.TempDir(), "id.key"), "--server", server, "--stun", stunAddr,
			"--no-direct", "--relay", dead, "--relay-transport", "tcp", "--relay-user", "u", "--relay-pass", "p", "--timeout", "3s", agent.node)
		var out connectJSON
		if code != 0 || json.Unmarshal([]byte(stdout), &out) != nil || out.Method != "relayed-https" || !strings.Contains(stderr, dead) {
			t.Errorf("exit %d, method %q; want 0, relayed-https, with the failed relay %s named:\n%s\n%s", code, out.Method, dead, stdout, stderr)
		}
	})

	// Ctrl-C stops the agent cleanly; then it is offline to the rendezvous server.
	if err := agent.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-agent.done:
		if agent.err != nil {
			t.Errorf("agent after SIGINT: %v, want exit 0\n%s", agent.err, agent.stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not stop within 10s of SIGINT")
	}
	_, stderr, code := runEnv(t, nil, "connect", "--identity", filepath.Join(t.TempDir(), "id.key"), "--server", server, "--stun", stunAddr, agent.node)
	if code != 1 || !strings.Contains(stderr, "is not connected to the rendezvous server") {
		t.Errorf("after the agent stopped: exit %d, want 1 with the offline message:\n%s", code, stderr)
	}
}

func TestConnectOfflinePeer(t *testing.T) {
	server, _ := servers(t)
	other, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	// Nothing answers STUN on port 9: the offline check must come before NAT profiling,
	// or the error would be about profiling (and slower).
	for _, jsonOut := range []bool{false, true} {
		args := []string{"connect", "--identity", filepath.Join(t.TempDir(), "id.key"), "--server", server, "--stun", "127.0.0.1:9", other.NodeID().String()}
		if jsonOut {
			args = append(args, "--json")
		}
		start := time.Now()
		stdout, stderr, code := runEnv(t, nil, args...)
		d := time.Since(start)
		want := "peer " + other.NodeID().String() + " is not connected to the rendezvous server"
		if code != 1 || !strings.Contains(stderr, want) {
			t.Errorf("json=%v: exit %d, want 1 with %q:\n%s", jsonOut, code, want, stderr)
		}
		if d > 2*time.Second {
			t.Errorf("json=%v: failing took %v, want under 2s", jsonOut, d)
		}
		if jsonOut {
			var out connectJSON
			if err := json.Unmarshal([]byte(stdout), &out); err != nil || out.ErrorKind != "peer_offline" || out.Method != "" {
				t.Errorf("JSON for an offline peer: %v: %s", err, stdout)
			}
		}
	}
}

func TestConnectAgentUsage(t *testing.T) {
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	node := id.NodeID().String()
	env := []string{"PEERLINK_SERVER=ws://127.0.0.1:1/", "PEERLINK_STUN=127.0.0.1:9", "PEERLINK_IDENTITY=" + filepath.Join(t.TempDir(), "id.key")}
	tests := []struct {
		env      []string
		args     []string
		code     int
		contains string
	}{
		{env, []string{"connect"}, 2, "want exactly one <node>"},
		{env, []string{"connect", node, node}, 2, "want exactly one <node>"},
		{env, []string{"connect", "plnotanode"}, 2, "malformed NodeID"},
		{env, []string{"connect", "--bogus", node}, 2, "flag provided but not defined"},
		{env, []string{"connect", "--no-relay", "--no-direct", node}, 2, "leave no way to connect"},
		{env, []string{"connect", "--no-direct", "--relay", "none", node}, 2, "--no-direct needs a relay"},
		{env, []string{"connect", "--timeout", "0s", node}, 2, "--timeout must be positive"},
		{env, []string{"connect", "--relay-transport", "quic", node}, 2, "want udp, tcp or tls"},
		{nil, []string{"connect", "--stun", "127.0.0.1:9", node}, 2, "no rendezvous server"},
		{nil, []string{"connect", "--server", "ws://127.0.0.1:1/", node}, 2, "no STUN servers"},
		{env, []string{"connect", "-h"}, 0, "Examples:"},
		{env, []string{"agent", "extra"}, 2, `unexpected argument "extra"`},
		{env, []string{"agent", "--idle", "-1s"}, 2, "--idle must be positive"},
		{nil, []string{"agent", "--stun", "127.0.0.1:9"}, 2, "no rendezvous server"},
		{env, []string{"agent", "--help"}, 0, "Examples:"},
		// A rendezvous server that is not there is a failure (1), not a usage error.
		{env, []string{"connect", node}, 1, "cannot reach the rendezvous server ws://127.0.0.1:1/"},
		{env, []string{"agent"}, 1, "cannot reach the rendezvous server ws://127.0.0.1:1/"},
	}
	for _, tt := range tests {
		stdout, stderr, code := runEnv(t, tt.env, tt.args...)
		if code != tt.code || !strings.Contains(stdout+stderr, tt.contains) {
			t.Errorf("peerlink %v: exit %d, want %d; output %q does not contain %q", tt.args, code, tt.code, stdout+stderr, tt.contains)
		}
	}
}

// TestConnectExplain checks that each way Connect fails gets its own message, naming
// what to do.
func TestConnectExplain(t *testing.T) {
	target, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	relayed := &signal.ConnectionInfo{Candidates: []signal.Candidate{{Type: signal.CandidateRelayed}}}
	tests := []struct {
		name       string
		err        error
		relay      string
		own, their *signal.ConnectionInfo
		kind, want string
	}{
		{"offline", fmt.Errorf("connect: offer: %w", connect.ErrPeerOffline), "", nil, nil, "peer_offline", "is not connected to the rendezvous server"},
		{"symmetric", fmt.Errorf("connect: x: %w", connect.ErrSymmetricNAT), "", nil, nil, "symmetric_nat", "both peers are behind symmetric NATs and relay is disabled: enable relay"},
		{"no relay configured", fmt.Errorf("connect: %w", connect.ErrNoRelay), "", nil, nil, "no_relay", "pass --relay HOST:PORT"},
		{"peer has no relay", fmt.Errorf("connect: %w", connect.ErrNoRelay), "r.example:3478", relayed, nil, "no_relay", "start its agent with --relay"},
		{"our relay failed", fmt.Errorf("connect: %w: relay r.example:3478 is unreachable", connect.ErrNoRelay), "r.example:3478", nil, relayed, "no_relay", "the relay r.example:3478 failed"},
		{"punching failed", fmt.Errorf("connect: %w", connect.ErrPunchFailed), "", nil, nil, "punch_failed", "hole punching to"},
		{"timeout", fmt.Errorf("connect: %w", connect.ErrTimeout), "", nil, nil, "timeout", "no path to"},
	}
	for _, tt := range tests {
		c := &connector{nf: nodeFlags{relay: tt.relay, server: "ws://rv.example/", relayTransport: "udp"}, target: target.NodeID(), opts: connect.Options{Timeout: time.Second}}
		kind, err := c.explain(tt.err, tt.own, tt.their)
		if kind != tt.kind || err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: kind %q, error %v; want %q containing %q", tt.name, kind, err, tt.kind, tt.want)
		}
	}
}
