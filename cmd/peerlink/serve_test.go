package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"peerlink/relay"
	"peerlink/store/natsstore/natstest"
)

// serveProc is a running `peerlink serve`.
type serveProc struct {
	cmd    *exec.Cmd
	lines  map[string]string // first word of each stdout line before "ready" → the rest
	stderr *syncBuffer
	done   chan struct{}
	err    error
}

// syncBuffer is a bytes.Buffer the process writes while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServe runs peerlink serve and waits for its "ready" line.
func startServe(t *testing.T, env []string, args ...string) *serveProc {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"serve"}, args...)...)
	cmd.Env = append(cleanEnv(), env...)
	p := &serveProc{cmd: cmd, lines: map[string]string{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		isReady := false
		for sc.Scan() {
			line := sc.Text()
			if !isReady {
				if line == "ready" {
					isReady = true
					close(ready)
					continue
				}
				k, v, _ := strings.Cut(line, " ")
				if k == "relay" {
					tr, a, _ := strings.Cut(v, " ")
					k, v = "relay-"+tr, a
				}
				p.lines[k] = v
			}
		}
		io.Copy(io.Discard, out)
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill() // the process this test started, by its PID
			<-p.done
		}
	})
	select {
	case <-ready:
	case <-p.done:
		t.Fatalf("peerlink serve exited before it was ready: %v\n%s", p.err, p.stderr)
	case <-time.After(20 * time.Second):
		t.Fatalf("peerlink serve not ready within 20s\n%s", p.stderr)
	}
	return p
}

// stop sends sig and checks that serve exits 0 promptly.
func (p *serveProc) stop(t *testing.T, sig syscall.Signal) time.Duration {
	t.Helper()
	start := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("serve did not stop within 10s of %v\n%s", sig, p.stderr)
	}
	if p.err != nil {
		t.Errorf("serve after %v: %v, want exit 0\n%s", sig, p.err, p.stderr)
	}
	return time.Since(start)
}

func (p *serveProc) stunAddr(t *testing.T) string {
	t.Helper()
	f := strings.Fields(p.lines["stun"])
	if len(f) < 2 || f[0] != "udp" {
		t.Fatalf("no STUN address in serve's output: %v", p.lines)
	}
	return f[1]
}

// loopbackServe are the flags for a serve with every server on loopback ports.
func loopbackServe(extra ...string) []string {
	return append([]string{"--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0", "--stun-alt-ip", "127.0.0.2",
		"--relay-listen", "127.0.0.1:0", "--relay-allow-loopback-peers"}, extra...)
}

func TestServeEndToEnd(t *testing.T) {
	srv := startServe(t, []string{"PEERLINK_TURN_SECRET=s3cret"},
		loopbackServe("--metrics", "127.0.0.1:0", "--log-format", "json", "--log-level", "debug")...)
	server, stunAddr, relayAddr := srv.lines["rendezvous"], srv.stunAddr(t), srv.lines["relay-udp"]
	if !strings.HasPrefix(server, "ws://127.0.0.1:") || relayAddr == "" || srv.lines["relay-tcp"] == "" {
		t.Fatalf("serve's listening lines: %v", srv.lines)
	}
	if !strings.Contains(srv.lines["stun"], "rfc5780") {
		t.Errorf("STUN without RFC 5780 despite --stun-alt-ip: %q", srv.lines["stun"])
	}

	t.Run("netcheck against its STUN", func(t *testing.T) {
		stdout, stderr, code := runEnv(t, nil, "netcheck", "--stun", stunAddr, "--json")
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		var out netcheckJSON
		if err := json.Unmarshal([]byte(stdout), &out); err != nil {
			t.Fatalf("%v: %s", err, stdout)
		}
		if out.NATType != "open" || out.Mapping.String() != "ei" || out.Filtering.String() != "ei" {
			t.Errorf("netcheck on loopback: %s", stdout)
		}
		if len(out.Servers) == 0 || !out.Servers[0].RFC5780 {
			t.Errorf("serve's STUN not seen as RFC 5780: %+v", out.Servers)
		}
	})

	// No relay address or password anywhere: the relay registered itself with the
	// rendezvous, and the agent gets TURN credentials from the rendezvous, which shares
	// the secret with the relay.
	agent := startAgent(t, "--server", server, "--stun", stunAddr)
	hasRelayed := false
	for _, c := range agent.ready.Candidates {
		hasRelayed = hasRelayed || strings.HasPrefix(c, "relayed ")
	}
	if !hasRelayed {
		t.Errorf("agent got no relayed candidate from serve's relay with the rendezvous' credentials: %v\n%s", agent.ready.Candidates, agent.stderr)
	}
	for _, tt := range []struct {
		name   string
		args   []string
		method string
	}{
		{"direct", nil, "direct"},
		{"through the relay", []string{"--no-direct", "--relay", relayAddr}, "relayed"},
		{"through the registered relay", []string{"--no-direct"}, "relayed"},
	} {
		t.Run("connect "+tt.name, func(t *testing.T) {
			args := append([]string{"connect", "--json", "--identity", filepath.Join(t.TempDir(), "id.key"), "--server", server, "--stun", stunAddr}, tt.args...)
			stdout, stderr, code := runEnv(t, nil, append(args, agent.node)...)
			if code != 0 {
				t.Fatalf("exit %d\n%s\n%s", code, stdout, stderr)
			}
			var out connectJSON
			if err := json.Unmarshal([]byte(stdout), &out); err != nil || out.Method != tt.method || out.TimeToFirstByteMS == nil {
				t.Errorf("connect: %v, method %q, want %q: %s", err, out.Method, tt.method, stdout)
			}
		})
	}

	t.Run("metrics and health", func(t *testing.T) {
		base := strings.TrimSuffix(srv.lines["metrics"], "/metrics")
		for path, want := range map[string]string{"/healthz": "ok", "/metrics": "# TYPE"} {
			resp, err := http.Get(base + path)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.Contains(string(body), want) {
				t.Errorf("GET %s: %d %.200s", path, resp.StatusCode, body)
			}
		}
	})

	if d := srv.stop(t, syscall.SIGTERM); d > 5*time.Second {
		t.Errorf("serve took %v to stop after SIGTERM", d)
	}
	// --log-format json: every line on stderr is a JSON record.
	sawStopped := false
	for line := range strings.Lines(srv.stderr.String()) {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Errorf("stderr line is not JSON: %q", line)
			continue
		}
		sawStopped = sawStopped || rec["msg"] == "stopped"
	}
	if !sawStopped {
		t.Errorf("no \"stopped\" record after SIGTERM:\n%s", srv.stderr)
	}
}

// TestServeNATS runs two serve processes on one NATS server: a node on one reaches a
// node on the other.
func TestServeNATS(t *testing.T) {
	ns := natstest.Start(t)
	a := startServe(t, nil, "--nats", ns.ClientURL(), "--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0", "--relay-listen", "off")
	b := startServe(t, nil, "--nats", ns.ClientURL(), "--listen", "127.0.0.1:0", "--stun-listen", "off", "--relay-listen", "off")
	if _, ok := b.lines["stun"]; ok {
		t.Errorf("--stun-listen off still started STUN: %v", b.lines)
	}
	stunAddr := a.stunAddr(t)
	agent := startAgent(t, "--server", a.lines["rendezvous"], "--stun", stunAddr)
	stdout, stderr, code := runEnv(t, nil, "connect", "--json", "--identity", filepath.Join(t.TempDir(), "id.key"),
		"--server", b.lines["rendezvous"], "--stun", stunAddr, agent.node)
	if code != 0 {
		t.Fatalf("connect through the other server: exit %d\n%s\n%s", code, stdout, stderr)
	}
	a.stop(t, syscall.SIGINT)
	b.stop(t, syscall.SIGTERM)
}

func TestServeConfigFile(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, file string
		env, args  []string
		check      func(t *testing.T, p *serveProc)
	}{
		{
			name: "key=value",
			file: "# peerlink serve\nlisten = 127.0.0.1:0\nstun_listen=127.0.0.1:0\nstun-alt-ip = \"127.0.0.2\"\nrelay-listen=off\nlog-format=json\n",
			check: func(t *testing.T, p *serveProc) {
				if !strings.Contains(p.lines["stun"], "rfc5780 127.0.0.1:") || p.lines["relay-udp"] != "" {
					t.Errorf("settings from the file not applied: %v", p.lines)
				}
			},
		},
		{
			name: "json, flags and environment win",
			file: `{"listen": "127.0.0.1:0", "stun-listen": "127.0.0.1:0", "stun-alt-ip": "127.0.0.3", "relay-listen": "off", "relay-user": ["a:b", "c:d"], "relay-allow-loopback-peers": true, "turn-ttl": "10m"}`,
			env:  []string{"PEERLINK_STUN_ALT_IP=127.0.0.2"},
			args: []string{"--relay-listen", "127.0.0.1:0"},
			check: func(t *testing.T, p *serveProc) {
				if !strings.Contains(p.lines["stun"], " 127.0.0.2:") || strings.Contains(p.lines["stun"], "127.0.0.3") {
					t.Errorf("environment did not win over the file: %q", p.lines["stun"])
				}
				if p.lines["relay-udp"] == "" {
					t.Errorf("the flag did not win over the file: %v", p.lines)
				}
			},
		},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, "serve"+string(rune('a'+i))+".conf")
			if err := os.WriteFile(path, []byte(tt.file), 0o600); err != nil {
				t.Fatal(err)
			}
			p := startServe(t, tt.env, append([]string{"--config", path}, tt.args...)...)
			tt.check(t, p)
			p.stop(t, syscall.SIGTERM)
		})
	}
}

func TestServeEnv(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "serve.conf")
	os.WriteFile(conf, []byte("stun-listen=127.0.0.1:0\n"), 0o600)
	p := startServe(t, []string{
		"PEERLINK_CONFIG=" + conf, "PEERLINK_LISTEN=127.0.0.1:0", "PEERLINK_RELAY_LISTEN=off",
		"PEERLINK_STUN_TCP=false", "PEERLINK_LOG_LEVEL=warn",
	})
	if p.lines["rendezvous"] == "" || p.lines["relay-udp"] != "" {
		t.Errorf("environment not applied: %v", p.lines)
	}
	if s := p.lines["stun"]; !strings.HasPrefix(s, "udp 127.0.0.1:") || strings.Contains(s, "tcp") {
		t.Errorf("PEERLINK_CONFIG's file or PEERLINK_STUN_TCP not applied: %q", s)
	}
	p.stop(t, syscall.SIGINT)
	if strings.Contains(p.stderr.String(), "level=INFO") {
		t.Errorf("PEERLINK_LOG_LEVEL=warn still logged info:\n%s", p.stderr)
	}
}

func TestServeUsage(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.conf")
	os.WriteFile(bad, []byte("listen=127.0.0.1:0\nfrobnicate=1\n"), 0o600)
	badJSON := filepath.Join(dir, "bad.json")
	os.WriteFile(badJSON, []byte(`{"listen": {"nested": 1}}`), 0o600)
	// A UDP port in use: serve cannot start its STUN server there.
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	busy := pc.LocalAddr().String()
	tests := []struct {
		env      []string
		args     []string
		code     int
		contains string
	}{
		{nil, []string{"-h"}, 0, "Examples:"},
		{nil, []string{"--bogus"}, 2, "flag provided but not defined"},
		{nil, []string{"extra"}, 2, `unexpected argument "extra"`},
		{nil, []string{"--log-format", "xml"}, 2, "want text or json"},
		{nil, []string{"--log-level", "loud"}, 2, "want debug, info, warn or error"},
		{[]string{"PEERLINK_TURN_TTL=forever"}, nil, 2, "PEERLINK_TURN_TTL"},
		{nil, []string{"--config", bad}, 2, "bad.conf:2: unknown setting \"frobnicate\""},
		{nil, []string{"--config", badJSON}, 2, "want a string, number or boolean"},
		{nil, []string{"--config", filepath.Join(dir, "missing.conf")}, 2, "--config"},
		{nil, []string{"--cert", "c.pem"}, 2, "--cert and --key go together"},
		{nil, []string{"--relay-source-quota", "-1"}, 2, "--relay-source-quota must not be negative"},
		{[]string{"PEERLINK_RELAY_REQUEST_RATE=0"}, nil, 2, "--relay-request-rate and --relay-request-burst must be positive"},
		{nil, []string{"--listen", "off", "--stun-listen", "off", "--relay-listen", "off"}, 2, "nothing to serve"},
		{nil, []string{"--stun-listen", busy, "--relay-listen", "off", "--listen", "off"}, 1, "is --stun-listen " + busy + " free?"},
		{nil, []string{"--stun-alt-ip", "127.0.0.2", "--stun-listen", ":0", "--relay-listen", "off", "--listen", "off"}, 2, "stun:"},
	}
	for _, tt := range tests {
		stdout, stderr, code := runEnv(t, tt.env, append([]string{"serve"}, tt.args...)...)
		if code != tt.code || !strings.Contains(stdout+stderr, tt.contains) {
			t.Errorf("serve %v (env %v): exit %d, want %d; output %q does not contain %q", tt.args, tt.env, code, tt.code, stdout+stderr, tt.contains)
		}
	}
}

// TestServeSettingsPrecedence checks flags > environment > file > defaults in process.
func TestServeSettingsPrecedence(t *testing.T) {
	file := filepath.Join(t.TempDir(), "s.conf")
	os.WriteFile(file, []byte("turn-ttl=5m\nrate=7\nrealm=file\nturn-uri=turn:a:1,turn:b:2\nstun-tcp=false\n"), 0o600)
	tests := []struct {
		name  string
		args  []string
		env   map[string]string
		check func(s *serveSettings) bool
	}{
		{"file", []string{"--config", file}, nil, func(s *serveSettings) bool {
			return s.turnTTL == 5*time.Minute && s.rate == 7 && s.realm == "file" && !s.stunTCP &&
				reflect.DeepEqual([]string(s.turnURIs), []string{"turn:a:1", "turn:b:2"})
		}},
		{"env over file", []string{"--config", file}, map[string]string{"PEERLINK_REALM": "env", "PEERLINK_TURN_URI": "turn:c:3"}, func(s *serveSettings) bool {
			return s.realm == "env" && s.rate == 7 && reflect.DeepEqual([]string(s.turnURIs), []string{"turn:c:3"})
		}},
		{"flag over env", []string{"--realm", "flag"}, map[string]string{"PEERLINK_REALM": "env", "PEERLINK_CONFIG": file}, func(s *serveSettings) bool {
			return s.realm == "flag" && s.turnTTL == 5*time.Minute
		}},
		{"defaults", nil, nil, func(s *serveSettings) bool {
			return s.realm == "peerlink" && s.turnTTL == time.Hour && s.stunListen == ":3478" && s.relayListen == ":3480" && s.stunTCP && !s.skipSigCheck
		}},
		{"skip signature checks from the environment", nil, map[string]string{"PEERLINK_SKIP_SIGNATURE_CHECK": "true"}, func(s *serveSettings) bool {
			return s.skipSigCheck
		}},
	}
	for _, tt := range tests {
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		var s serveSettings
		s.register(fs)
		if err := fs.Parse(tt.args); err != nil {
			t.Fatal(err)
		}
		if err := resolveServeSettings(fs, &s, func(k string) string { return tt.env[k] }); err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if !tt.check(&s) {
			t.Errorf("%s: settings %+v", tt.name, s)
		}
	}
}

func TestParseServeConfig(t *testing.T) {
	tests := []struct {
		in   string
		want []configEntry
		err  bool
	}{
		{"", nil, false},
		{"# only a comment\n\n", nil, false},
		{"a=1\n  B_c = 'x y' \n", []configEntry{{"a", []string{"1"}, 1}, {"b-c", []string{"x y"}, 2}}, false},
		{"k=v=w", []configEntry{{"k", []string{"v=w"}, 1}}, false},
		{"novalue", nil, true},
		{"=1", nil, true},
		{`{"b": 2, "a": [true, "x"], "c": 1.5}`, []configEntry{{"a", []string{"true", "x"}, 0}, {"b", []string{"2"}, 0}, {"c", []string{"1.5"}, 0}}, false},
		{`{"a": null}`, nil, true},
		{`{"a": [[1]]}`, nil, true},
		{`{"a": 1`, nil, true},
	}
	for _, tt := range tests {
		got, err := parseServeConfig([]byte(tt.in))
		if (err != nil) != tt.err || (err == nil && !reflect.DeepEqual(got, tt.want)) {
			t.Errorf("parseServeConfig(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.err)
		}
		if err != nil && !errors.Is(err, errConfigSyntax) {
			t.Errorf("parseServeConfig(%q): error %v does not wrap errConfigSyntax", tt.in, err)
		}
	}
}

func FuzzParseServeConfig(f *testing.F) {
	for _, s := range []string{"listen=:8080\n# c\nturn-uri=a,b\n", `{"listen": ":8080", "relay-user": ["a:b"], "rate": 2.5, "stun-tcp": false}`, "k='v'", "{", ""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		entries, err := parseServeConfig(data)
		if err != nil {
			if !errors.Is(err, errConfigSyntax) {
				t.Fatalf("error %v does not wrap errConfigSyntax", err)
			}
			return
		}
		for _, e := range entries {
			if e.key == "" || e.key != normKey(e.key) {
				t.Fatalf("entry with a bad key: %+v", e)
			}
		}
	})
}

// TestServeRelayLimits checks that serve's relay gets the per-source limits its flags
// say: the relay's defaults unless told, 0 for no cap, and the request limit off.
func TestServeRelayLimits(t *testing.T) {
	for _, tt := range []struct {
		args  []string
		check func(c relay.Config) bool
	}{
		{nil, func(c relay.Config) bool {
			return c.PerSourceQuota == relay.DefaultPerSourceQuota && !c.RequestLimit.Disabled && c.RequestLimit.Rate == relay.DefaultRequestRate
		}},
		{[]string{"--relay-source-quota", "0", "--relay-no-request-limit"}, func(c relay.Config) bool {
			return c.PerSourceQuota < 0 && c.RequestLimit.Disabled
		}},
		{[]string{"--relay-source-quota", "5", "--relay-request-rate", "9", "--relay-request-burst", "30"}, func(c relay.Config) bool {
			return c.PerSourceQuota == 5 && c.RequestLimit.Rate == 9 && c.RequestLimit.Burst == 30
		}},
	} {
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		var s serveSettings
		s.register(fs)
		if err := fs.Parse(tt.args); err != nil {
			t.Fatal(err)
		}
		if err := resolveServeSettings(fs, &s, func(string) string { return "" }); err != nil {
			t.Fatal(err)
		}
		cfg, err := s.relayConfig(slog.New(slog.DiscardHandler), nil)
		if err != nil {
			t.Fatal(err)
		}
		if !tt.check(cfg) {
			t.Errorf("serve %v: relay source quota %d, request limit %+v", tt.args, cfg.PerSourceQuota, cfg.RequestLimit)
		}
	}
}
