// Package demo runs peerlink end to end inside the userspace NAT emulator, with no root
// and no internet: servers, peers behind several NAT kinds, real profiling and a
// connection between every ordered pair, checked against the traversal plan.
package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/internal/emuworld"
	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/netlab"
	"peerlink/punch"
	"peerlink/signal"
)

// ErrUnsupportedKind is returned for a NAT kind the emulator cannot host in the demo.
var ErrUnsupportedKind = errors.New("demo: NAT kind not supported in the emulator")

// DefaultKinds are the peers a demo runs when Config.Kinds is empty: one behind each
// kind the emulator can host (UDP-blocked peers need TURN over TCP, which it has not).
func DefaultKinds() []netlab.Kind {
	return []netlab.Kind{
		netlab.KindNone, netlab.KindFullCone, netlab.KindRestrictedCone, netlab.KindPortRestricted,
		netlab.KindSymmetric, netlab.KindSymmetricSequential, netlab.KindCGNAT,
	}
}

// Config shapes a demo run. The zero value runs DefaultKinds with seed 0, no added
// latency and the default timeouts.
type Config struct {
	// Kinds are the peers, one per entry (a kind may repeat); empty means DefaultKinds.
	Kinds []netlab.Kind
	// Seed drives every random choice of the emulator (ports, loss).
	Seed uint64
	// Latency is the one-way delay of each NAT's uplink and each public peer's link;
	// zero means none.
	Latency time.Duration
	// Timeout bounds each connection attempt until its first path; zero means 10 s.
	Timeout time.Duration
	// DirectWait is how long a relayed connection may take to move to the direct path
	// its plan promises; zero means 10 s.
	DirectWait time.Duration
	// Parallel is how many pairs connect at once (each peer is in at most one pair at a
	// time); zero means every pair of a round at once.
	Parallel int
	// Progress, when set, is called with a line for people as the demo goes, one call
	// at a time.
	Progress func(string)
	// Logger receives the components' logs; nil means quiet.
	Logger *slog.Logger
}

// Duration is a time.Duration that marshals as milliseconds.
type Duration time.Duration

// MarshalJSON writes milliseconds with microsecond precision.
func (d Duration) MarshalJSON() ([]byte, error) {
	return fmt.Appendf(nil, "%.3f", float64(time.Duration(d).Microseconds())/1000), nil
}

// UnmarshalJSON reads milliseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var ms float64
	if err := json.Unmarshal(b, &ms); err != nil {
		return err
	}
	*d = Duration(math.Round(ms * float64(time.Millisecond)))
	return nil
}

// Peer is one peer of the demo and what profiling found.
type Peer struct {
	Name string      `json:"name"`
	Kind netlab.Kind `json:"kind"`
	Node string      `json:"node"`
	// Expected is the behaviour the emulated NAT is built to have, Profile what the
	// node measured with STUN.
	Expected string      `json:"expected"`
	Detected string      `json:"detected"`
	Profile  nat.Profile `json:"profile"`
	Matches  bool        `json:"matches"`
	// StartTime is how long starting the node took: profiling, relay, publishing.
	StartTime Duration `json:"start_ms"`
	Error     string   `json:"error,omitempty"`
}

// Pair is one connection: Initiator connected to Responder.
type Pair struct {
	Initiator string `json:"initiator"`
	Responder string `json:"responder"`
	// Plan is nat.Strategy for the two detected profiles; Predicted the method its
	// primary technique gives.
	Plan      string `json:"plan"`
	Predicted string `json:"predicted"`
	Technique string `json:"technique,omitempty"`
	Method    string `json:"method,omitempty"`
	Connected bool   `json:"connected"`
	// OK: connected, and the method is the predicted one.
	OK bool `json:"ok"`
	// FirstPath is the time to the first working path (relayed, usually); ToDirect to
	// the direct path, nil when there is none.
	FirstPath *Duration `json:"first_path_ms"`
	ToDirect  *Duration `json:"to_direct_ms"`
	Error     string    `json:"error,omitempty"`
}

// Report is a demo's outcome.
type Report struct {
	Peers   []Peer   `json:"peers"`
	Pairs   []Pair   `json:"pairs"`
	Elapsed Duration `json:"elapsed_ms"`
	// OK: every peer started and matched its expected profile, and every pair
	// connected by the predicted method.
	OK bool `json:"ok"`
}

// Failures counts peers and pairs that are not OK.
func (r *Report) Failures() int {
	n := 0
	for _, p := range r.Peers {
		if !p.Matches {
			n++
		}
	}
	for _, p := range r.Pairs {
		if !p.OK {
			n++
		}
	}
	return n
}

// world is the emulated internet and the servers on it.
type world struct {
	cfg Config
	ew  *emuworld.World

	progressMu sync.Mutex
}

// Run builds the world, starts and profiles every peer, connects every ordered pair and
// reports. It returns an error only when the world cannot be built; failed peers and
// pairs are in the report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if len(cfg.Kinds) == 0 {
		cfg.Kinds = DefaultKinds()
	}
	for _, k := range cfg.Kinds {
		if k == netlab.KindUDPBlocked || k <= netlab.KindUnknown || k > netlab.KindUDPBlocked {
			return nil, fmt.Errorf("%w: %s", ErrUnsupportedKind, k)
		}
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.DirectWait <= 0 {
		cfg.DirectWait = 10 * time.Second
	}
	start := time.Now()
	w, err := newWorld(cfg)
	if err != nil {
		return nil, err
	}
	defer w.close()

	rep := &Report{}
	nodes := w.startPeers(ctx, rep)
	defer func() {
		for _, n := range nodes {
			if n != nil {
				n.close()
			}
		}
	}()
	rep.Pairs = w.connectAll(ctx, nodes)
	rep.Elapsed = Duration(time.Since(start))
	rep.OK = rep.Failures() == 0 && ctx.Err() == nil
	return rep, ctx.Err()
}

func (w *world) progress(format string, args ...any) {
	if w.cfg.Progress != nil {
		w.progressMu.Lock()
		defer w.progressMu.Unlock()
		w.cfg.Progress(fmt.Sprintf(format, args...))
	}
}

func newWorld(cfg Config) (*world, error) {
	ew, err := emuworld.Start(emuworld.Config{
		Seed: cfg.Seed, Logger: cfg.Logger,
		// Every peer signs in at once.
		Signal: signal.Config{RateLimit: 1000, RateBurst: 1000},
	})
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	return &world{cfg: cfg, ew: ew}, nil
}

// close stops the servers and the network.
func (w *world) close() { w.ew.Close() }

// peer is a running demo node and the goroutines answering its connections.
type peer struct {
	name string
	node *connect.Node
	sig  *signal.Client
	stop context.CancelFunc
	wg   sync.WaitGroup
}

func (p *peer) close() {
	p.stop()
	p.node.Close() // ends the echo loops' Recv
	p.wg.Wait()
	p.sig.Close()
}

// host places a peer of kind k on the emulated internet and returns its host.
func (w *world) host(name string, k netlab.Kind) (*natlab.Host, error) {
	site, err := w.ew.AddSite(name, emuworld.SiteConfig{NAT: k.String(), Link: natlab.Link{Latency: w.cfg.Latency}})
	if err != nil {
		return nil, err
	}
	return site.Host, nil
}

// startPeers starts every peer at once, profiling each NAT for real, and fills
// rep.Peers. Peers that failed to start are nil in the result.
func (w *world) startPeers(ctx context.Context, rep *Report) []*peer {
	peers := make([]*peer, len(w.cfg.Kinds))
	rep.Peers = make([]Peer, len(w.cfg.Kinds))
	hosts := make([]*natlab.Host, len(w.cfg.Kinds))
	for i, k := range w.cfg.Kinds {
		name := k.String()
		if n := countBefore(w.cfg.Kinds, i); n > 0 {
			name = fmt.Sprintf("%s-%d", name, n+1)
		}
		rep.Peers[i] = Peer{Name: name, Kind: k, Expected: netlab.ClaimString(k.Claim())}
		h, err := w.host(name, k)
		if err != nil {
			rep.Peers[i].Error = err.Error()
			continue
		}
		hosts[i] = h
	}
	w.progress("world: STUN %s+%s (RFC 5780), TURN %s, rendezvous %s; starting %d peers", emuworld.STUNIP1, emuworld.STUNIP2, emuworld.TURNIP, w.ew.SignalURL, len(peers))
	var wg sync.WaitGroup
	for i := range peers {
		if hosts[i] == nil {
			continue
		}
		wg.Go(func() {
			r := &rep.Peers[i]
			start := time.Now()
			p, err := w.startPeer(ctx, r.Name, hosts[i])
			r.StartTime = Duration(time.Since(start))
			if err != nil {
				r.Error = err.Error()
				return
			}
			peers[i] = p
			r.Node = p.node.NodeID().String()
			r.Profile = p.node.Profile()
			r.Detected = netlab.ClaimString(r.Profile)
			r.Matches = sameBehaviour(r.Profile, w.cfg.Kinds[i].Claim())
		})
	}
	wg.Wait()
	for _, r := range rep.Peers {
		if r.Error != "" {
			w.progress("peer %-16s failed to start: %s", r.Name, r.Error)
			continue
		}
		mark := ""
		if !r.Matches {
			mark = "  MISMATCH: built as " + r.Expected
		}
		w.progress("peer %-16s %-28s detected %-14s in %v%s", r.Name, r.Profile.Classic().Describe(), r.Detected, time.Duration(r.StartTime).Round(time.Millisecond), mark)
	}
	return peers
}

func countBefore(kinds []netlab.Kind, i int) int {
	n := 0
	for _, k := range kinds[:i] {
		if k == kinds[i] {
			n++
		}
	}
	return n
}

// sameBehaviour compares what matters for planning: policies, the contiguity step and
// whether there is a NAT at all.
func sameBehaviour(got, want nat.Profile) bool {
	if got.Open != want.Open || got.Type() != want.Type() {
		return false
	}
	return want.Allocation != nat.AllocationPC || got.PortDelta == want.PortDelta
}

func (w *world) startPeer(ctx context.Context, name string, h *natlab.Host) (*peer, error) {
	id, err := identity.Generate()
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	sig, err := signal.Dial(sctx, w.ew.SignalURL, id, &signal.Options{Logger: w.cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	node, err := connect.Start(sctx, connect.Config{
		Identity: id, Signal: sig, Net: h, Logger: w.cfg.Logger,
		STUN:     w.ew.STUN,
		Relay:    &connect.RelayConfig{Server: w.ew.TURN, Username: emuworld.TURNUser, Password: emuworld.TURNPassword},
		LocalIPs: func() ([]netip.Addr, error) { return h.Addrs(), nil },
		// The emulator delivers at once: probes can be paced far faster than on a real
		// network without loss.
		Punch: punch.Config{Pace: time.Millisecond, ProbeInterval: time.Millisecond, CheckInterval: 20 * time.Millisecond},
	})
	if err != nil {
		sig.Close()
		return nil, err
	}
	// Wait for the relay allocation so that every pair starts from the same footing.
	if err := node.WaitRelay(sctx); err != nil {
		node.Close()
		sig.Close()
		return nil, fmt.Errorf("relay: %w", err)
	}
	actx, stop := context.WithCancel(context.Background())
	p := &peer{name: name, node: node, sig: sig, stop: stop}
	p.wg.Go(func() { p.serve(actx) })
	return p, nil
}

// serve accepts connections and echoes every datagram back, as peerlink agent does.
func (p *peer) serve(ctx context.Context) {
	for {
		c, err := p.node.Accept(ctx)
		if err != nil {
			return
		}
		p.wg.Go(func() {
			defer c.Close()
			for {
				b, err := c.Recv(ctx)
				if err != nil {
					return
				}
				c.Send(b)
			}
		})
	}
}

// rounds schedules every unordered pair of n peers so that each peer is in at most one
// pair per round (the circle method).
func rounds(n int) [][][2]int {
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	if n%2 == 1 {
		idx = append(idx, -1) // a bye
	}
	m := len(idx)
	var out [][][2]int
	for range m - 1 {
		var round [][2]int
		for i := range m / 2 {
			a, b := idx[i], idx[m-1-i]
			if a >= 0 && b >= 0 {
				round = append(round, [2]int{min(a, b), max(a, b)})
			}
		}
		out = append(out, round)
		// Keep the first, rotate the rest.
		last := idx[m-1]
		copy(idx[2:], idx[1:m-1])
		idx[1] = last
	}
	return out
}

// connectAll connects every ordered pair of started peers, round by round.
func (w *world) connectAll(ctx context.Context, peers []*peer) []Pair {
	n := len(peers)
	results := make(map[[2]int]*Pair)
	var mu sync.Mutex
	par := w.cfg.Parallel
	if par <= 0 {
		par = n
	}
	sem := make(chan struct{}, par)
	for _, round := range rounds(n) {
		var wg sync.WaitGroup
		for _, pr := range round {
			wg.Go(func() {
				sem <- struct{}{}
				defer func() { <-sem }()
				for _, dir := range [][2]int{{pr[0], pr[1]}, {pr[1], pr[0]}} {
					r := w.connectPair(ctx, peers[dir[0]], peers[dir[1]])
					if peers[dir[0]] != nil && peers[dir[1]] != nil {
						w.report(r)
					}
					mu.Lock()
					results[dir] = r
					mu.Unlock()
				}
			})
		}
		wg.Wait()
	}
	out := make([]Pair, 0, n*(n-1))
	for i := range n {
		for j := range n {
			if r := results[[2]int{i, j}]; r != nil {
				out = append(out, *r)
			}
		}
	}
	return out
}

func (w *world) report(r *Pair) {
	if !r.Connected {
		w.progress("%-16s → %-16s FAILED (%s): %s", r.Initiator, r.Responder, r.Plan, r.Error)
		return
	}
	d := "-"
	if r.ToDirect != nil {
		d = time.Duration(*r.ToDirect).Round(time.Millisecond).String()
	}
	mark := ""
	if !r.OK {
		mark = "  predicted " + r.Predicted
	}
	w.progress("%-16s → %-16s %-8s %-9s first path %-7v direct %v%s", r.Initiator, r.Responder, r.Method, r.Technique,
		time.Duration(*r.FirstPath).Round(time.Millisecond), d, mark)
}

// predicted is the method a plan's primary technique gives.
func predicted(p nat.Plan) connect.Method {
	switch p.Primary().Technique {
	case nat.Direct, nat.Reversal, nat.Local:
		return connect.MethodDirect
	case nat.Relay, nat.TechniqueNone:
		return connect.MethodRelayed
	}
	return connect.MethodPunched
}

// connectPair connects a to b, checks that datagrams flow, waits for the direct path
// the plan promises and checks the settled path too.
func (w *world) connectPair(ctx context.Context, a, b *peer) *Pair {
	r := &Pair{}
	if a == nil || b == nil {
		r.Error = "a peer did not start"
		if a != nil {
			r.Initiator = a.name
		}
		if b != nil {
			r.Responder = b.name
		}
		return r
	}
	r.Initiator, r.Responder = a.name, b.name
	plan := nat.Strategy(a.node.Profile(), b.node.Profile())
	want := predicted(plan)
	r.Plan, r.Predicted = plan.String(), want.String()

	conn, err := a.node.Connect(ctx, b.node.NodeID(), connect.Options{Timeout: w.cfg.Timeout})
	if err != nil {
		r.Error = err.Error()
		return r
	}
	defer conn.Close()
	ectx, cancel := context.WithTimeout(ctx, w.cfg.Timeout)
	err = echo(ectx, conn)
	cancel()
	if err != nil {
		r.Error = fmt.Sprintf("connected (%s) but no echo: %v", conn.Method(), err)
		return r
	}
	if conn.Method().Relayed() && conn.Technique() != nat.Relay {
		waitDirect(ctx, a.node, b.node.NodeID(), conn, w.cfg.DirectWait)
	}
	ectx, cancel = context.WithTimeout(ctx, w.cfg.Timeout)
	err = echo(ectx, conn)
	cancel()
	if err != nil {
		r.Error = fmt.Sprintf("no echo over the %s path: %v", conn.Method(), err)
		return r
	}
	st := conn.Stats()
	r.Connected = true
	r.Method, r.Technique = conn.Method().String(), conn.Technique().String()
	fp := Duration(st.FirstPath)
	r.FirstPath = &fp
	if st.ToDirect > 0 && !conn.Method().Relayed() {
		td := Duration(st.ToDirect)
		r.ToDirect = &td
	}
	r.OK = conn.Method() == want
	return r
}

// waitDirect waits until conn leaves the relay or the node stops trying.
func waitDirect(ctx context.Context, n *connect.Node, peer identity.NodeID, conn *connect.Conn, limit time.Duration) {
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for conn.Method().Relayed() {
		if !slices.ContainsFunc(n.Pending(), func(a connect.Attempt) bool { return a.Peer == peer && a.Initiator }) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			return
		case <-tick.C:
		}
	}
}

// echo sends a probe until the peer echoes it (datagrams may be lost while paths
// settle).
func echo(ctx context.Context, conn *connect.Conn) error {
	probe := fmt.Appendf(nil, "peerlink-demo %d", time.Now().UnixNano())
	for {
		conn.Send(probe)
		rctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		for {
			b, err := conn.Recv(rctx)
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				break
			}
			if err != nil {
				cancel()
				return err
			}
			if string(b) == string(probe) {
				cancel()
				return nil
			}
		}
		cancel()
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}
