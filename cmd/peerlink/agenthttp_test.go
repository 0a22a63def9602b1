package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"peerlink/identity"
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

// post sends a JSON POST to the agent's API with extra headers, and returns the status
// code and the decoded answer.
func post(t *testing.T, url, body string, header map[string]string) (int, map[string]string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		if k == "Host" {
			req.Host = v
		} else {
			req.Header.Set(k, v)
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]string
	b, _ := io.ReadAll(resp.Body)
	json.Unmarshal(b, &out)
	if out == nil {
		out = map[string]string{"raw": string(b)}
	}
	return resp.StatusCode, out
}

// TestAgentConnectAPI makes one agent connect to another through POST /api/connect:
// the connection is listed with its method and, once the peer echoes the agent's pings,
// its round trip, loss and quality; bad, self, offline and cross-origin requests are
// refused with the reason.
func TestAgentConnectAPI(t *testing.T) {
	server, stunAddr := servers(t)
	a := startAgent(t, "--server", server, "--stun", stunAddr, "--http", "127.0.0.1:0")
	b := startAgent(t, "--server", server, "--stun", stunAddr)
	api := a.ready.HTTP + "api/connect"
	body := `{"node": "` + b.node + `"}`
	offline, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}

	for _, tt := range []struct {
		name   string
		body   string
		header map[string]string
		code   int
		errHas string
	}{
		{"not JSON", `node=x`, nil, http.StatusBadRequest, "want JSON"},
		{"not a NodeID", `{"node": "nope"}`, nil, http.StatusBadRequest, "is not a NodeID"},
		{"itself", `{"node": "` + a.node + `"}`, nil, http.StatusBadRequest, "own NodeID"},
		{"an offline node", `{"node": "` + offline.NodeID().String() + `"}`, nil, http.StatusNotFound, "connecting to"},
		{"another site's page", body, map[string]string{"Origin": "http://evil.example"}, http.StatusForbidden, "cross-origin"},
		{"a null origin", body, map[string]string{"Origin": "null"}, http.StatusForbidden, "cross-origin"},
		{"a cross-site fetch", body, map[string]string{"Sec-Fetch-Site": "cross-site"}, http.StatusForbidden, "cross-origin"},
		{"a same-site fetch", body, map[string]string{"Sec-Fetch-Site": "same-site"}, http.StatusForbidden, "cross-origin"},
		{"a rebound DNS name", body, map[string]string{"Host": "evil.example:7474", "Origin": "http://evil.example:7474"}, http.StatusMisdirectedRequest, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, out := post(t, api, tt.body, tt.header)
			if code != tt.code || !strings.Contains(out["error"]+out["raw"], tt.errHas) {
				t.Errorf("POST %s: %d %v, want %d with %q", tt.body, code, out, tt.code, tt.errHas)
			}
		})
	}
	var st agentStatus
	if err := json.Unmarshal([]byte(httpGet(t, a.ready.HTTP+"api/status")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Connections) != 0 || st.Initiated != 0 {
		t.Fatalf("refused requests made connections: %+v", st)
	}

	origin := strings.TrimSuffix(a.ready.HTTP, "/")
	code, out := post(t, api, body, map[string]string{"Origin": origin, "Sec-Fetch-Site": "same-origin"})
	if code != http.StatusOK || out["peer"] != b.node || out["method"] != "direct" {
		t.Fatalf("POST /api/connect from the dashboard's origin: %d %v", code, out)
	}
	b.next(t, "connected", a.node)
	// The agent pings once a second; b echoes.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := json.Unmarshal([]byte(httpGet(t, a.ready.HTTP+"api/status")), &st); err != nil {
			t.Fatal(err)
		}
		if len(st.Connections) == 1 && st.Connections[0].RTTMS != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no round trip measured within 10 s: %+v", st.Connections)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c := st.Connections[0]
	if c.Peer != b.node || !c.Outgoing || c.Method != "direct" || *c.RTTMS <= 0 || *c.RTTMS > 500 || c.Loss == nil || *c.Loss != 0 || c.Quality == nil || *c.Quality < 80 || st.Initiated != 1 {
		t.Errorf("connection made from the dashboard: %+v (rtt %v, loss %v, quality %v)", c, deref(c.RTTMS), deref(c.Loss), deref(c.Quality))
	}
	// The same figures, per peer, on /metrics.
	metrics := httpGet(t, a.ready.HTTP+"metrics")
	for _, name := range []string{"peerlink_agent_peer_rtt_seconds", "peerlink_agent_peer_quality", "peerlink_agent_peer_loss_ratio"} {
		if want := name + `{method="` + c.Method + `",peer="` + b.node + `"}`; !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	// Connecting again returns the open connection rather than making another.
	if code, out := post(t, api, body, nil); code != http.StatusOK || out["peer"] != b.node {
		t.Errorf("second POST: %d %v", code, out)
	}
	if err := json.Unmarshal([]byte(httpGet(t, a.ready.HTTP+"api/status")), &st); err != nil || len(st.Connections) != 1 || st.Initiated != 1 {
		t.Errorf("after a second POST to the same peer: %v %+v", err, st)
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, b)
	}
	return string(b)
}

// TestAgentEvents reads the agent's event stream: the first event is the status at
// once, and a connection made meanwhile shows up in a later one without asking.
func TestAgentEvents(t *testing.T) {
	server, stunAddr := servers(t)
	a := startAgent(t, "--server", server, "--stun", stunAddr, "--http", "127.0.0.1:0")
	resp, err := http.Get(a.ready.HTTP + "api/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q", ct)
	}
	events := make(chan agentStatus, 16)
	go func() {
		defer close(events)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			data, ok := strings.CutPrefix(sc.Text(), "data: ")
			if !ok {
				continue
			}
			var st agentStatus
			if err := json.Unmarshal([]byte(data), &st); err != nil {
				t.Errorf("event data is not the status: %v: %s", err, data)
				return
			}
			events <- st
		}
	}()
	next := func() agentStatus {
		t.Helper()
		select {
		case st, ok := <-events:
			if !ok {
				t.Fatal("event stream ended")
			}
			return st
		case <-time.After(5 * time.Second):
			t.Fatal("no event within 5 s")
		}
		return agentStatus{}
	}
	if st := next(); st.Node != a.node || !st.Up || st.Profile == nil || st.NAT == "" {
		t.Errorf("first event: %+v", st)
	}
	key := filepath.Join(t.TempDir(), "c.key")
	self := nodeIDOf(t, key)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runEnv(t, nil, "connect", "--identity", key, "--server", server, "--stun", stunAddr, "--json", a.node)
	}()
	defer func() { <-done }()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case <-deadline:
			t.Fatal("the connection never appeared in the event stream")
		default:
		}
		st := next()
		if len(st.Connections) == 1 && st.Connections[0].Peer == self && !st.Connections[0].Outgoing && st.Accepted == 1 {
			return
		}
	}
}

// TestAgentPages serves the dashboard's page and assets with headers that keep other
// sites out, and /metrics even under a Host name (for scrapers).
func TestAgentPages(t *testing.T) {
	server, stunAddr := servers(t)
	a := startAgent(t, "--server", server, "--stun", stunAddr, "--http", "127.0.0.1:0")
	for _, tt := range []struct {
		path, host string
		code       int
		ctype, has string
	}{
		{"", "", 200, "text/html", `<form id="connect-form"`},
		{"agent.js", "", 200, "javascript", "api/connect"},
		{"dashboard.js", "", 200, "javascript", "EventSource"},
		{"dashboard.css", "", 200, "text/css", "--direct"},
		{"", "localhost", 200, "text/html", "peerlink agent"},
		{"", "peerlink.example", http.StatusMisdirectedRequest, "", ""},
		{"api/status", "peerlink.example", http.StatusMisdirectedRequest, "", ""},
		{"metrics", "peerlink.example", 200, "text/plain", "peerlink_agent_datagrams_echoed_total"},
		{"nothing", "", 404, "", ""},
	} {
		req, _ := http.NewRequest(http.MethodGet, a.ready.HTTP+tt.path, nil)
		if tt.host != "" {
			req.Host = tt.host
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.code || !strings.Contains(resp.Header.Get("Content-Type"), tt.ctype) || !strings.Contains(string(b), tt.has) {
			t.Errorf("GET /%s (Host %q): %s %q, want %d %q with %q", tt.path, tt.host, resp.Status, resp.Header.Get("Content-Type"), tt.code, tt.ctype, tt.has)
		}
		if tt.path == "" && tt.code == 200 && !strings.Contains(resp.Header.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
			t.Errorf("the page may be framed: CSP %q", resp.Header.Get("Content-Security-Policy"))
		}
	}
}

// freePort returns a loopback port that was free for both TCP and UDP a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		pc, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			pc.Close()
			return strconv.Itoa(port)
		}
	}
	t.Fatal("no free port")
	return ""
}

// TestAgentReconnects restarts the rendezvous server under an agent: the dashboard's
// status says the node is down meanwhile and connections cannot be made, the agent
// comes back by itself after its jittered backoff, and the connection it had to
// another agent lives through it all.
func TestAgentReconnects(t *testing.T) {
	rvPort, stunPort := freePort(t), freePort(t)
	args := []string{"--listen", "127.0.0.1:" + rvPort, "--stun-listen", "127.0.0.1:" + stunPort, "--relay-listen", "off"}
	srv := startServe(t, nil, args...)
	a := startAgent(t, "--server", srv.lines["rendezvous"], "--stun", "127.0.0.1:"+stunPort, "--http", "127.0.0.1:0")
	status := func() agentStatus {
		var st agentStatus
		if err := json.Unmarshal([]byte(httpGet(t, a.ready.HTTP+"api/status")), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	if !status().Up {
		t.Fatal("agent not up at start")
	}
	b := startAgent(t, "--server", srv.lines["rendezvous"], "--stun", "127.0.0.1:"+stunPort)
	if code, out := post(t, a.ready.HTTP+"api/connect", `{"node": "`+b.node+`"}`, nil); code != http.StatusOK {
		t.Fatalf("POST /api/connect to the other agent: %d %v", code, out)
	}
	conn := func() (connStatus, bool) {
		for _, c := range status().Connections {
			if c.Peer == b.node {
				return c, true
			}
		}
		return connStatus{}, false
	}
	before, ok := conn()
	if !ok {
		t.Fatal("the connection to the other agent is not listed")
	}
	srv.stop(t, syscall.SIGTERM)
	for deadline := time.Now().Add(5 * time.Second); status().Up; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the dashboard still says up 5 s after the rendezvous server stopped")
		}
	}
	other, _ := identity.Generate()
	if code, out := post(t, a.ready.HTTP+"api/connect", `{"node": "`+other.NodeID().String()+`"}`, nil); code != http.StatusServiceUnavailable || !strings.Contains(out["error"], "not running") {
		t.Errorf("POST /api/connect while down: %d %v", code, out)
	}
	startServe(t, nil, args...)
	deadline := time.After(10 * time.Second)
	for reconnected := false; !reconnected; {
		select {
		case ev := <-a.events:
			reconnected = ev.Event == "reconnected"
		case <-deadline:
			t.Fatal("agent did not reconnect within 10 s of the server's restart")
		}
	}
	if st := status(); !st.Up || st.Node != a.node {
		t.Errorf("status after reconnecting: %+v", st)
	}
	// The same connection (made before the restart) still carries the pings.
	after, ok := conn()
	if !ok || !after.Since.Equal(before.Since) {
		t.Fatalf("the connection made before the restart is gone: before %+v, after %+v (listed %v)", before, after, ok)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if c, _ := conn(); c.Datagrams > after.Datagrams {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the connection made before the restart carries nothing after it")
		}
	}
}
