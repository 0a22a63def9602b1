package main

import (
	"context"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/relay"
	"peerlink/relayreg"
	psignal "peerlink/signal"
	"peerlink/stun"
)

// serveStatus is what the server dashboard shows (GET /api/status on the metrics
// listener, and each event of /api/events there). A server that is off is absent.
type serveStatus struct {
	Started    time.Time         `json:"started"`
	Rendezvous *rendezvousStatus `json:"rendezvous,omitempty"`
	STUN       *stunStatus       `json:"stun,omitempty"`
	Relay      *relayStatus      `json:"relay,omitempty"`
	// Relays are the relays registered in the rendezvous store, this one included.
	Relays      []registeredRelay `json:"relays"`
	RelaysError string            `json:"relays_error,omitempty"`
}

type rendezvousStatus struct {
	Connections   int64   `json:"connections"`
	Authenticated int64   `json:"authenticated"`
	Routed        uint64  `json:"routed"`
	Errors        uint64  `json:"errors"`
	Abusive       uint64  `json:"abusive"`
	RoutedPerSec  float64 `json:"routed_per_sec"`
	// Peers are the connected nodes, at most maxDashboardRows of them.
	Peers []rendezvousPeer `json:"peers"`
}

type rendezvousPeer struct {
	Node      string    `json:"node"`
	Remote    string    `json:"remote"`
	LastHeard time.Time `json:"last_heard"`
}

type stunStatus struct {
	Requests       uint64  `json:"requests"`
	Responses      uint64  `json:"responses"`
	RateLimited    uint64  `json:"rate_limited"`
	RequestsPerSec float64 `json:"requests_per_sec"`
}

type relayStatus struct {
	Enabled         bool    `json:"enabled"`
	Sessions        int     `json:"sessions"`
	SessionsTotal   uint64  `json:"sessions_total"`
	Refused         uint64  `json:"refused"`
	BytesToPeers    uint64  `json:"bytes_to_peers"`
	BytesToClients  uint64  `json:"bytes_to_clients"`
	ToPeersPerSec   float64 `json:"to_peers_bytes_per_sec"`
	ToClientsPerSec float64 `json:"to_clients_bytes_per_sec"`
	// List has the busiest sessions, at most maxDashboardRows.
	List []relaySession `json:"list"`
}

type relaySession struct {
	ID        uint64    `json:"id"`
	User      string    `json:"user"`
	Transport string    `json:"transport"`
	Client    string    `json:"client"`
	Relayed   string    `json:"relayed"`
	Peers     []string  `json:"peers"`
	Start     time.Time `json:"start"`
	// BytesIn is client to peers, BytesOut peers to client.
	BytesIn   uint64  `json:"bytes_in"`
	BytesOut  uint64  `json:"bytes_out"`
	InPerSec  float64 `json:"in_bytes_per_sec"`
	OutPerSec float64 `json:"out_bytes_per_sec"`
}

type registeredRelay struct {
	Node      string    `json:"node"`
	Endpoints []string  `json:"endpoints"`
	Capacity  int       `json:"capacity"`
	Load      int       `json:"load"`
	Updated   time.Time `json:"updated"`
}

const (
	// dashboardInterval is how often the server dashboard samples the servers'
	// counters while someone looks at it.
	dashboardInterval = time.Second
	// dashboardIdle is how long after the last look the sampling pauses: listing a
	// busy relay's sessions every second is work no one needs unwatched.
	dashboardIdle = 10 * time.Second
	// maxDashboardRows bounds the peers and sessions listed, so that the page stays
	// fast on a busy server.
	maxDashboardRows = 200
)

// serveDashboard samples serve's servers for the dashboard. Its fields name the servers
// that run; Run samples until its context ends.
type serveDashboard struct {
	stun   *stun.Server
	relay  *relay.Server
	sig    *psignal.Server
	relays *relayreg.Registry

	changes  broadcaster
	done     chan struct{}
	once     sync.Once
	lastLook atomic.Int64 // unix nanoseconds of the last snapshot served
	sampling sync.Mutex   // one sample at a time: each builds on the one before

	mu   sync.Mutex
	cur  serveStatus
	prev dashboardSample
}

// dashboardSample is the counters at one moment, for rates.
type dashboardSample struct {
	at                 time.Time
	stunRequests       uint64
	routed             uint64
	toPeers, toClients uint64
	sessIn, sessOut    map[uint64]uint64
}

func newServeDashboard() *serveDashboard {
	return &serveDashboard{done: make(chan struct{}), cur: serveStatus{Started: time.Now().UTC(), Relays: []registeredRelay{}}}
}

// run samples every dashboardInterval until ctx ends.
func (d *serveDashboard) run(ctx context.Context) error {
	t := time.NewTicker(dashboardInterval)
	defer t.Stop()
	for {
		if time.Since(time.Unix(0, d.lastLook.Load())) < dashboardIdle {
			d.sample(ctx)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// stop ends the event streams; it is idempotent.
func (d *serveDashboard) stop() { d.once.Do(func() { close(d.done) }) }

func (d *serveDashboard) sample(ctx context.Context) {
	d.sampling.Lock()
	defer d.sampling.Unlock()
	now := time.Now()
	d.mu.Lock()
	prev := d.prev
	d.mu.Unlock()
	dt := now.Sub(prev.at).Seconds()
	per := func(cur, old uint64) float64 {
		if prev.at.IsZero() || dt <= 0 || cur < old {
			return 0
		}
		return float64(cur-old) / dt
	}
	next := dashboardSample{at: now, sessIn: map[uint64]uint64{}, sessOut: map[uint64]uint64{}}
	st := serveStatus{Relays: []registeredRelay{}}
	if d.sig != nil {
		s := d.sig.Stats()
		next.routed = s.Routed
		rv := &rendezvousStatus{Connections: s.Connections, Authenticated: s.Authenticated, Routed: s.Routed, Errors: s.Errors, Abusive: s.Abusive,
			RoutedPerSec: per(s.Routed, prev.routed), Peers: []rendezvousPeer{}}
		for _, p := range d.sig.Peers() {
			rv.Peers = append(rv.Peers, rendezvousPeer{Node: p.Node.String(), Remote: p.Remote, LastHeard: p.LastHeard.UTC()})
		}
		if len(rv.Peers) > maxDashboardRows {
			rv.Peers = rv.Peers[:maxDashboardRows]
		}
		st.Rendezvous = rv
	}
	if d.stun != nil {
		s := d.stun.Stats()
		next.stunRequests = s.Requests
		st.STUN = &stunStatus{Requests: s.Requests, Responses: s.Responses, RateLimited: s.Dropped.RateLimited, RequestsPerSec: per(s.Requests, prev.stunRequests)}
	}
	if d.relay != nil {
		s := d.relay.Stats()
		next.toPeers, next.toClients = s.BytesToPeers, s.BytesToClients
		rs := &relayStatus{Enabled: s.Enabled, Sessions: s.Sessions, SessionsTotal: s.SessionsTotal, Refused: s.Refused,
			BytesToPeers: s.BytesToPeers, BytesToClients: s.BytesToClients,
			ToPeersPerSec: per(s.BytesToPeers, prev.toPeers), ToClientsPerSec: per(s.BytesToClients, prev.toClients), List: []relaySession{}}
		for _, si := range d.relay.Sessions() {
			next.sessIn[si.ID], next.sessOut[si.ID] = si.BytesIn, si.BytesOut
			v := relaySession{ID: si.ID, User: si.User, Transport: string(si.Transport), Client: si.Client.String(), Relayed: si.Relayed.String(),
				Peers: []string{}, Start: si.Start.UTC(), BytesIn: si.BytesIn, BytesOut: si.BytesOut}
			if old, ok := prev.sessIn[si.ID]; ok {
				v.InPerSec, v.OutPerSec = per(si.BytesIn, old), per(si.BytesOut, prev.sessOut[si.ID])
			}
			for _, p := range si.Peers {
				v.Peers = append(v.Peers, p.String())
			}
			rs.List = append(rs.List, v)
		}
		if len(rs.List) > maxDashboardRows {
			sort.SliceStable(rs.List, func(i, j int) bool {
				a, b := rs.List[i], rs.List[j]
				return a.InPerSec+a.OutPerSec > b.InPerSec+b.OutPerSec
			})
			rs.List = rs.List[:maxDashboardRows]
		}
		st.Relay = rs
	}
	if d.relays != nil {
		lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		list, err := d.relays.ListRelays(lctx)
		cancel()
		if err != nil {
			st.RelaysError = err.Error()
		}
		for _, r := range list {
			v := registeredRelay{Node: r.NodeID.String(), Endpoints: []string{}, Capacity: r.Capacity, Load: r.Load, Updated: r.Updated.UTC()}
			for _, e := range r.Endpoints {
				v.Endpoints = append(v.Endpoints, e.String())
			}
			st.Relays = append(st.Relays, v)
		}
	}
	d.mu.Lock()
	st.Started = d.cur.Started
	d.cur, d.prev = st, next
	d.mu.Unlock()
	d.changes.notify()
}

// snapshot returns the latest sample, first sampling afresh if the dashboard was
// unwatched.
func (d *serveDashboard) snapshot(ctx context.Context) serveStatus {
	if time.Since(time.Unix(0, d.lastLook.Swap(time.Now().UnixNano()))) >= dashboardIdle {
		d.sample(ctx)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cur
}

// routes adds the dashboard (/), /api/status and /api/events to mux.
func (d *serveDashboard) routes(mux *http.ServeMux) {
	servePage(mux, "serve.html")
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.snapshot(r.Context()))
	})
	mux.HandleFunc("GET /api/events", func(w http.ResponseWriter, r *http.Request) {
		serveEvents(w, r, "status", func() any { return d.snapshot(r.Context()) }, &d.changes, d.done)
	})
}
