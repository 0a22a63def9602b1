package main

import (
	"encoding/json"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"peerlink/connect"
	"peerlink/nat"
)

// agentStatus is the agent's state as its HTTP API shows it (GET /api/status).
type agentStatus struct {
	Node        string       `json:"node"`
	Server      string       `json:"server,omitempty"`
	Profile     *nat.Profile `json:"profile,omitempty"`
	Candidates  []string     `json:"candidates,omitempty"`
	Connections []connStatus `json:"connections"`
	// Accepted counts the connections accepted since the agent started.
	Accepted int `json:"accepted"`
}

type connStatus struct {
	Peer              string    `json:"peer"`
	Method            string    `json:"method"`
	Technique         string    `json:"technique"`
	Since             time.Time `json:"since"`
	TimeToFirstPathMS float64   `json:"time_to_first_path_ms"`
	TimeToDirectMS    *float64  `json:"time_to_direct_ms"`
	Datagrams         int       `json:"datagrams"`
}

// agentState keeps what the HTTP API and /metrics report; the connections' goroutines
// update it.
type agentState struct {
	mu       sync.Mutex
	status   agentStatus
	conns    map[*connect.Conn]*connStatus
	accepted *prometheus.CounterVec
	echoed   prometheus.Counter
	reg      *prometheus.Registry
}

func newAgentState() *agentState {
	s := &agentState{conns: map[*connect.Conn]*connStatus{}, reg: prometheus.NewRegistry()}
	s.accepted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "peerlink_agent_connections_accepted_total", Help: "Connections accepted, by the method of their first path.",
	}, []string{"method"})
	s.echoed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "peerlink_agent_datagrams_echoed_total", Help: "Datagrams echoed back to their senders.",
	})
	open := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "peerlink_agent_connections", Help: "Open connections, by current method.",
	}, []string{"method"})
	s.reg.MustRegister(s.accepted, s.echoed, collectorFunc{open, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		open.Reset()
		for c := range s.conns {
			open.WithLabelValues(c.Method().String()).Inc()
		}
	}})
	return s
}

// collectorFunc refreshes a gauge vector just before it is collected.
type collectorFunc struct {
	*prometheus.GaugeVec
	refresh func()
}

func (c collectorFunc) Collect(ch chan<- prometheus.Metric) {
	c.refresh()
	c.GaugeVec.Collect(ch)
}

func (s *agentState) node(node, server string, prof *nat.Profile, cands []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.status.Node, s.status.Server, s.status.Profile, s.status.Candidates = node, server, prof, cands
}

func (s *agentState) add(c *connect.Conn) {
	st := c.Stats()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns[c] = &connStatus{Peer: c.Peer().String(), Since: time.Now().UTC(), TimeToFirstPathMS: ms(st.FirstPath)}
	s.status.Accepted++
	s.accepted.WithLabelValues(c.Method().String()).Inc()
}

func (s *agentState) echoedOne(c *connect.Conn) {
	s.mu.Lock()
	if cs := s.conns[c]; cs != nil {
		cs.Datagrams++
	}
	s.mu.Unlock()
	s.echoed.Inc()
}

func (s *agentState) remove(c *connect.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *agentState) snapshot() agentStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.status
	out.Connections = []connStatus{}
	for c, cs := range s.conns {
		v := *cs
		v.Method, v.Technique = c.Method().String(), c.Technique().String()
		if d := c.Stats().ToDirect; d > 0 {
			v.TimeToDirectMS = ptr(ms(d))
		}
		out.Connections = append(out.Connections, v)
	}
	sort.Slice(out.Connections, func(i, j int) bool { return out.Connections[i].Since.Before(out.Connections[j].Since) })
	return out
}

// serveHTTP serves the API on ln until it is closed: /api/status (JSON) and /metrics
// (Prometheus).
func (s *agentState) serveHTTP(ln net.Listener) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(s.snapshot())
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(ln)
	return hs
}
