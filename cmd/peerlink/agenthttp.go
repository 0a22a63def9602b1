package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/nat"
	"peerlink/partynet"
	"peerlink/session"
)

// agentStatus is the agent's state as its HTTP API shows it (GET /api/status, and each
// event of /api/events).
type agentStatus struct {
	Node   string `json:"node"`
	Server string `json:"server,omitempty"`
	// Up is true while the node runs and, with a server, its rendezvous connection is up.
	Up      bool         `json:"up"`
	Profile *nat.Profile `json:"profile,omitempty"`
	// NAT names the profile's NAT in words ("port-restricted cone NAT").
	NAT        string   `json:"nat,omitempty"`
	Candidates []string `json:"candidates,omitempty"`
	// ProfileChanges are the latest changes of the profile, newest first.
	ProfileChanges []profileChange `json:"profile_changes"`
	Connections    []connStatus    `json:"connections"`
	// Accepted counts the connections accepted since the agent started, Initiated those
	// it made (POST /api/connect).
	Accepted  int `json:"accepted"`
	Initiated int `json:"initiated"`
	// Party is the party's virtual LAN when the agent runs one (peerlink up).
	Party *partynet.Status `json:"party,omitempty"`
}

type profileChange struct {
	Time time.Time `json:"time"`
	From string    `json:"from"`
	To   string    `json:"to"`
}

// maxProfileChanges is how many profile changes the status keeps.
const maxProfileChanges = 10

type connStatus struct {
	Peer string `json:"peer"`
	// Outgoing is true for a connection this agent made.
	Outgoing          bool      `json:"outgoing"`
	Method            string    `json:"method"`
	Technique         string    `json:"technique"`
	Since             time.Time `json:"since"`
	TimeToFirstPathMS float64   `json:"time_to_first_path_ms"`
	TimeToDirectMS    *float64  `json:"time_to_direct_ms"`
	Datagrams         int       `json:"datagrams"`
	// Fallbacks and Restores count moves to the relay and back (connect.Stats).
	Fallbacks int `json:"fallbacks"`
	Restores  int `json:"restores"`
	// The path's health from the agent's pings, which the peer echoes; nil until the
	// first echo (a peer that echoes nothing, like 'peerlink connect', has none).
	RTTMS    *float64 `json:"rtt_ms"`
	JitterMS *float64 `json:"jitter_ms"`
	Loss     *float64 `json:"loss"`
	Quality  *int     `json:"quality"`
}

// connRecord is one open connection in agentState.
type connRecord struct {
	st    connStatus
	probe *prober
}

// dialFunc connects the running node to a peer and starts serving the connection.
type dialFunc func(ctx context.Context, peer identity.NodeID) (*connect.Conn, error)

// Errors of POST /api/connect.
var (
	errNotUp       = errors.New("the agent's node is not running (reconnecting to the rendezvous server?)")
	errConnectSelf = errors.New("that is this agent's own NodeID")
)

// agentState keeps what the HTTP API and /metrics report; the connections' goroutines
// update it.
type agentState struct {
	mu       sync.Mutex
	status   agentStatus
	conns    map[*connect.Conn]*connRecord
	dial     dialFunc // nil while no node runs
	changes  broadcaster
	accepted *prometheus.CounterVec
	echoed   prometheus.Counter
	reg      *prometheus.Registry
	party    func() partynet.Status // nil without a party
}

func newAgentState() *agentState {
	s := &agentState{conns: map[*connect.Conn]*connRecord{}, reg: prometheus.NewRegistry()}
	s.accepted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "peerlink_agent_connections_accepted_total", Help: "Connections accepted, by the method of their first path.",
	}, []string{"method"})
	s.echoed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "peerlink_agent_datagrams_echoed_total", Help: "Datagrams echoed back to their senders.",
	})
	open := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "peerlink_agent_connections", Help: "Open connections, by current method.",
	}, []string{"method"})
	s.reg.MustRegister(peerMetrics{s})
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

// node records a node that is up, and how to make connections with it.
func (s *agentState) node(node, server string, prof *nat.Profile, cands []string, dial dialFunc) {
	s.mu.Lock()
	s.status.Node, s.status.Server, s.status.Candidates = node, server, cands
	s.status.Up, s.dial = true, dial
	s.setProfileLocked(*prof)
	s.mu.Unlock()
	s.changes.notify()
}

// down records that the node stopped: no connections can be made until the next one.
func (s *agentState) down() {
	s.mu.Lock()
	s.status.Up, s.dial = false, nil
	s.mu.Unlock()
	s.changes.notify()
}

// profile records a new NAT profile, remembering the change.
func (s *agentState) profile(p nat.Profile) {
	s.mu.Lock()
	s.setProfileLocked(p)
	s.mu.Unlock()
	s.changes.notify()
}

func (s *agentState) setProfileLocked(p nat.Profile) {
	if old := s.status.Profile; old != nil && old.String() != p.String() {
		ch := profileChange{Time: time.Now().UTC(), From: old.String(), To: p.String()}
		s.status.ProfileChanges = append([]profileChange{ch}, s.status.ProfileChanges[:min(len(s.status.ProfileChanges), maxProfileChanges-1)]...)
	}
	s.status.Profile, s.status.NAT = &p, p.Classic().Describe()
}

// add records an open connection; adding it again changes nothing.
func (s *agentState) add(c *connect.Conn, outgoing bool, probe *prober) {
	st := c.Stats()
	s.mu.Lock()
	if s.conns[c] != nil {
		s.mu.Unlock()
		return
	}
	s.conns[c] = &connRecord{st: connStatus{Peer: c.Peer().String(), Outgoing: outgoing, Since: time.Now().UTC(), TimeToFirstPathMS: ms(st.FirstPath)}, probe: probe}
	if outgoing {
		s.status.Initiated++
	} else {
		s.status.Accepted++
		s.accepted.WithLabelValues(c.Method().String()).Inc()
	}
	s.mu.Unlock()
	s.changes.notify()
}

func (s *agentState) echoedOne(c *connect.Conn) {
	s.mu.Lock()
	if r := s.conns[c]; r != nil {
		r.st.Datagrams++
	}
	s.mu.Unlock()
	s.echoed.Inc()
}

func (s *agentState) remove(c *connect.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.changes.notify()
}

// outgoing returns the open connection this agent made to peer, if any.
func (s *agentState) outgoing(peer identity.NodeID) *connect.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c, r := range s.conns {
		if r.st.Outgoing && c.Peer() == peer {
			return c
		}
	}
	return nil
}

func (s *agentState) snapshot() agentStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.status
	out.ProfileChanges = append([]profileChange{}, s.status.ProfileChanges...)
	out.Connections = []connStatus{}
	for c, r := range s.conns {
		v := r.st
		st := c.Stats()
		v.Method, v.Technique = c.Method().String(), c.Technique().String()
		v.Fallbacks, v.Restores = st.Fallbacks, st.Restores
		if st.ToDirect > 0 {
			v.TimeToDirectMS = ptr(ms(st.ToDirect))
		}
		if r.probe != nil {
			if h, ok := r.probe.health(time.Now()); ok {
				v.RTTMS, v.JitterMS, v.Loss = ptr(ms(h.rtt)), ptr(ms(h.jitter)), ptr(h.loss)
				v.Quality = ptr(session.Quality(h.rtt, h.jitter, h.loss))
			}
		}
		out.Connections = append(out.Connections, v)
	}
	sort.Slice(out.Connections, func(i, j int) bool { return out.Connections[i].Since.Before(out.Connections[j].Since) })
	if s.party != nil {
		st := s.party()
		out.Party = &st
	}
	return out
}

// connectRequest is the body of POST /api/connect.
type connectRequest struct {
	Node string `json:"node"`
}

// maxConnectBody bounds POST /api/connect's body: a NodeID and some JSON.
const maxConnectBody = 4 << 10

// errBadConnectRequest is wrapped by parseConnectRequest's errors.
var errBadConnectRequest = errors.New("bad request")

// parseConnectRequest reads {"node": NodeID}.
func parseConnectRequest(body []byte) (identity.NodeID, error) {
	var req connectRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return identity.NodeID{}, fmt.Errorf("%w: want JSON {\"node\": NodeID}: %v", errBadConnectRequest, err)
	}
	id, err := identity.ParseNodeID(strings.TrimSpace(req.Node))
	if err != nil {
		return identity.NodeID{}, fmt.Errorf("%w: %q is not a NodeID: %v", errBadConnectRequest, req.Node, err)
	}
	return id, nil
}

// connectTimeout bounds POST /api/connect.
const connectTimeout = 20 * time.Second

func (s *agentState) handleConnect(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxConnectBody))
	if err != nil {
		writeJSON(w, http.StatusRequestEntityTooLarge, map[string]string{"error": err.Error()})
		return
	}
	peer, err := parseConnectRequest(body)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	s.mu.Lock()
	dial, self := s.dial, s.status.Node
	s.mu.Unlock()
	switch {
	case dial == nil:
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": errNotUp.Error()})
		return
	case peer.String() == self:
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": errConnectSelf.Error()})
		return
	}
	c := s.outgoing(peer)
	if c == nil {
		ctx, cancel := context.WithTimeout(r.Context(), connectTimeout)
		c, err = dial(ctx, peer)
		cancel()
		if err != nil {
			code := http.StatusBadGateway
			if errors.Is(err, connect.ErrPeerOffline) {
				code = http.StatusNotFound
			}
			writeJSON(w, code, map[string]string{"error": fmt.Sprintf("connecting to %s: %v", peer.Short(), err)})
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"peer": c.Peer().String(), "method": c.Method().String(), "technique": c.Technique().String()})
}

// serveHTTP serves the dashboard (/), the API (/api/status, /api/events, POST
// /api/connect) and /metrics on ln until the returned server is closed.
func (s *agentState) serveHTTP(ln net.Listener) *agentHTTP {
	done := make(chan struct{})
	mux := http.NewServeMux()
	servePage(mux, "agent.html")
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(s.snapshot())
	})
	mux.HandleFunc("GET /api/events", func(w http.ResponseWriter, r *http.Request) {
		serveEvents(w, r, "status", func() any { return s.snapshot() }, &s.changes, done)
	})
	mux.HandleFunc("POST /api/connect", s.handleConnect)
	top := http.NewServeMux()
	top.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	top.Handle("/", guard(mux))
	h := &agentHTTP{hs: &http.Server{Handler: top, ReadHeaderTimeout: 10 * time.Second}, done: done}
	h.wg.Go(func() { h.hs.Serve(ln) })
	return h
}

// agentHTTP is the agent's running HTTP server.
type agentHTTP struct {
	hs   *http.Server
	done chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

// Close ends the event streams, closes the server and waits for it; it is idempotent.
func (h *agentHTTP) Close() error {
	h.once.Do(func() {
		close(h.done)
		h.hs.Close()
	})
	h.wg.Wait()
	return nil
}

// httpListenAddr binds an address without a host to loopback only: the dashboard can
// make the agent connect to peers, so it is not for other machines unless asked.
func httpListenAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		if !strings.Contains(addr, ":") {
			return net.JoinHostPort("127.0.0.1", addr) // a bare port
		}
		return addr
	}
	if host == "" {
		return net.JoinHostPort("127.0.0.1", port)
	}
	return addr
}

// peerMetrics exports each open connection's health on /metrics, one series per peer:
// what the dashboard shows, for a scraper.
type peerMetrics struct{ s *agentState }

var (
	peerLabels      = []string{"peer", "method"}
	descPeerRTT     = prometheus.NewDesc("peerlink_agent_peer_rtt_seconds", "Round-trip time of the agent's pings to the peer.", peerLabels, nil)
	descPeerJitter  = prometheus.NewDesc("peerlink_agent_peer_jitter_seconds", "RFC 3550 jitter of the round trips to the peer.", peerLabels, nil)
	descPeerLoss    = prometheus.NewDesc("peerlink_agent_peer_loss_ratio", "Share of the last pings to the peer that got no echo (0-1).", peerLabels, nil)
	descPeerQuality = prometheus.NewDesc("peerlink_agent_peer_quality", "Path quality score of the connection, 0-100.", peerLabels, nil)
	descPeerMoves   = prometheus.NewDesc("peerlink_agent_peer_path_moves_total", "Moves between the direct path and the relay, by kind (fallback, restore).", append(peerLabels, "kind"), nil)
)

func (m peerMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPeerRTT, descPeerJitter, descPeerLoss, descPeerQuality, descPeerMoves} {
		ch <- d
	}
}

func (m peerMetrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.s.snapshot().Connections {
		l := []string{c.Peer, c.Method}
		gauge := func(d *prometheus.Desc, v float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
		}
		if c.RTTMS != nil {
			gauge(descPeerRTT, *c.RTTMS/1000)
		}
		if c.JitterMS != nil {
			gauge(descPeerJitter, *c.JitterMS/1000)
		}
		if c.Loss != nil {
			gauge(descPeerLoss, *c.Loss)
		}
		if c.Quality != nil {
			gauge(descPeerQuality, float64(*c.Quality))
		}
		ch <- prometheus.MustNewConstMetric(descPeerMoves, prometheus.CounterValue, float64(c.Fallbacks), c.Peer, c.Method, "fallback")
		ch <- prometheus.MustNewConstMetric(descPeerMoves, prometheus.CounterValue, float64(c.Restores), c.Peer, c.Method, "restore")
	}
}

// setParty makes the status show the party from status (peerlink up).
func (s *agentState) setParty(status func() partynet.Status) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.party = status
}
