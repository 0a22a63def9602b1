package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/nat"
	"peerlink/partynet"
)

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	idle := fs.Duration("idle", 5*time.Minute, "close a connection that carries nothing for this long")
	httpAddr := fs.String("http", "", "serve the agent's dashboard (/), status API (/api/status, /api/events, POST /api/connect) and Prometheus /metrics on this address, e.g. 127.0.0.1:7474; a port alone or :PORT binds to localhost only")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink agent [--server URL] [--identity FILE] [--stun HOST:PORT ...] [--relay HOST:PORT]
       [--relay-user U --relay-pass P] [--idle D] [--lan] [--http ADDR] [--json]

Runs a peerlink node that accepts connections until interrupted: it profiles the NAT,
publishes its candidates on the rendezvous server, prints its NodeID and profile, and
logs every connection (peer, method, technique). It echoes each datagram back to its
sender, which is what 'peerlink connect' measures. When the rendezvous connection drops
it reconnects, waiting longer after each failure (up to 30 s, each wait varied by up to
20% so that many agents do not all come back at the same moment).

With --http, a browser at that address shows the dashboard: the node, its NAT profile
and its changes, every connection with its method, round trip, jitter, loss and
quality, and a form that connects the agent to another NodeID. The agent pings its
connections for those figures, and echoes a peer agent's pings.

With --json, stdout carries one JSON object per line: "ready" (node, profile,
candidates), then "connected" (with "outgoing" for those the dashboard made),
"upgraded" and "closed" for each connection, and "profile" when the NAT profile changes.

Exit status: 0 after Ctrl-C or SIGTERM, 1 when it cannot start, 2 bad usage.

Examples:
  peerlink agent --server ws://rv.example:8080/ --stun 198.51.100.2:3478
  peerlink agent --relay relay.example:3478 --relay-user alice --json
  PEERLINK_SERVER=wss://rv.example/ PEERLINK_STUN=198.51.100.2:3478 peerlink agent
  peerlink agent --lan      # found over mDNS on the local network, no servers needed

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	if *idle <= 0 {
		return fmt.Errorf("%w: --idle must be positive", errUsage)
	}
	if err := nf.resolve(); err != nil {
		return err
	}
	id, err := nf.loadIdentity()
	if err != nil {
		return err
	}
	a := &agent{nf: nf, id: id, idle: *idle, stdout: stdout, stderr: stderr, log: nf.logger(stderr), state: newAgentState()}
	return a.serve(ctx, *httpAddr)
}

// serve runs the agent, with its dashboard, status API and /metrics on httpAddr
// unless that is empty.
func (a *agent) serve(ctx context.Context, httpAddr string) error {
	if httpAddr != "" {
		ln, err := net.Listen("tcp", httpListenAddr(httpAddr))
		if err != nil {
			return fmt.Errorf("agent HTTP API: %w (is --http %s free?)", err, httpAddr)
		}
		hs := a.state.serveHTTP(ln)
		defer hs.Close()
		a.httpURL = "http://" + ln.Addr().String() + "/"
	}
	return a.run(ctx)
}

// agent is one run of peerlink agent.
type agent struct {
	nf    nodeFlags
	id    *identity.Identity
	idle  time.Duration
	log   *slog.Logger
	state *agentState
	// httpURL is where the HTTP API listens ("" when it does not).
	httpURL string
	stderr  io.Writer

	mu     sync.Mutex // serialises output from the connections' goroutines
	stdout io.Writer

	// party is set for peerlink up: the agent runs the party's virtual LAN.
	party *partyOpts
}

// agentEvent is one line of --json output.
type agentEvent struct {
	Event             string       `json:"event"`
	Time              time.Time    `json:"time"`
	Node              string       `json:"node,omitempty"`
	Server            string       `json:"server,omitempty"`
	Profile           *nat.Profile `json:"profile,omitempty"`
	Candidates        []string     `json:"candidates,omitempty"`
	Peer              string       `json:"peer,omitempty"`
	Method            string       `json:"method,omitempty"`
	Technique         string       `json:"technique,omitempty"`
	TimeToFirstPathMS *float64     `json:"time_to_first_path_ms,omitempty"`
	TimeToDirectMS    *float64     `json:"time_to_direct_ms,omitempty"`
	Datagrams         *int         `json:"datagrams,omitempty"`
	Reason            string       `json:"reason,omitempty"`
	HTTP              string       `json:"http,omitempty"`
	Outgoing          bool         `json:"outgoing,omitempty"`
	Party             string       `json:"party,omitempty"`
	Interface         string       `json:"interface,omitempty"`
	IPv4              string       `json:"ipv4,omitempty"`
	IPv6              string       `json:"ipv6,omitempty"`
}

// emit prints ev as a JSON line, or text as a line for people.
func (a *agent) emit(ev agentEvent, text string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.nf.json {
		ev.Time = time.Now().UTC()
		json.NewEncoder(a.stdout).Encode(ev)
		return
	}
	fmt.Fprintln(a.stdout, text)
}

// reconnectJitter varies each reconnection wait by up to ±20%: after a rendezvous
// server restarts, its agents then come back spread out instead of all at once.
const reconnectJitter = 0.2

// backoff is an exponential backoff whose every wait is varied at random.
type backoff struct {
	first, max, cur time.Duration
	jitter          float64        // the share a wait may vary either way, 0-1
	rand            func() float64 // in [0, 1)
}

// newBackoff returns a backoff from first doubling up to max; a nil rand means
// math/rand/v2's.
func newBackoff(first, max time.Duration, jitter float64, rnd func() float64) *backoff {
	if rnd == nil {
		rnd = rand.Float64
	}
	return &backoff{first: first, max: max, cur: first, jitter: jitter, rand: rnd}
}

// next returns the next wait: the current step varied by up to ±jitter.
func (b *backoff) next() time.Duration {
	d := time.Duration(float64(b.cur) * (1 + b.jitter*(2*b.rand()-1)))
	b.cur = min(2*b.cur, b.max)
	return d
}

// reset starts again from the first step, after a connection that worked.
func (b *backoff) reset() { b.cur = b.first }

// run serves until ctx ends. The node lives as long as the agent: when the rendezvous
// connection drops, the agent dials again (waiting longer after each failure) and hands
// the node the new connection, so its connections, which need no server once made, go
// on. Only a failure to start at all is an error.
func (a *agent) run(ctx context.Context) error {
	sig, err := a.nf.dial(ctx, a.id, a.log)
	if err != nil {
		return err
	}
	var sigDone <-chan struct{} // nil (never ready) on the local network only
	if sig != nil {
		defer func() { sig.Close() }()
		sigDone = sig.Done()
	}
	node, err := a.nf.startNode(ctx, a.id, sig, a.log)
	if err != nil {
		return err
	}
	defer node.Close()

	// The ready line lists the relayed candidate when there is a relay: wait for the
	// allocation begun at start (it gives up on its own after a few seconds).
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	if err := node.WaitRelay(wctx); err != nil && !errors.Is(err, connect.ErrNoRelay) {
		fmt.Fprintf(a.stderr, "peerlink agent: relay: %v\n", err)
	}
	wcancel()
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	// dialMu orders the dashboard's connections against the end of the node: none
	// starts serving once the node is stopping.
	var dialMu sync.Mutex
	stopping := false
	dial := func(ctx context.Context, peer identity.NodeID) (*connect.Conn, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer context.AfterFunc(sctx, cancel)()
		defer cancel()
		c, err := node.Connect(ctx, peer, connect.Options{})
		if err != nil {
			return nil, err
		}
		dialMu.Lock()
		defer dialMu.Unlock()
		if stopping {
			c.Close()
			return nil, errNotUp
		}
		probe := newProber()
		a.state.add(c, true, probe) // listed before the dashboard hears of it
		wg.Go(func() { a.handle(sctx, c, true, probe) })
		return c, nil
	}
	// announce tells the dashboard and the output that the node is reachable through
	// the current rendezvous connection.
	announce := func(first bool) {
		own := published(ctx, sig, a.id.NodeID())
		prof := node.Profile()
		if own != nil {
			prof = profileOf(own) // with the main socket's reflexive address
		}
		cands := candidateStrings(own)
		a.state.node(a.id.NodeID().String(), a.nf.server, &prof, cands, dial)
		if first {
			a.emit(agentEvent{Event: "ready", Node: a.id.NodeID().String(), Server: a.nf.server, Profile: &prof, Candidates: cands, HTTP: a.httpURL},
				fmt.Sprintf("node: %s\nprofile: %s\ncandidates: %s\naccepting connections via %s (Ctrl-C to stop)",
					a.id.NodeID(), prof, strings.Join(cands, ", "), cmpOr(a.nf.server, "the local network (mDNS)")))
		} else {
			a.emit(agentEvent{Event: "reconnected", Node: a.id.NodeID().String(), Server: a.nf.server, Profile: &prof, Candidates: cands},
				fmt.Sprintf("%s reconnected to %s; profile: %s", stamp(), a.nf.server, prof))
		}
	}
	var dev *partynet.Device
	var devDone <-chan struct{}
	var dir sigDirectory
	if a.party != nil {
		dir.c.Store(sig)
		var stopControl io.Closer
		dev, stopControl, err = a.upParty(ctx, sig, node, &dir, cancel)
		if err != nil {
			cancel()
			return err
		}
		defer dev.Close()
		defer stopControl.Close()
		devDone = dev.Done()
		a.state.setParty(dev.Status)
	}
	announce(true)

	wg.Go(func() {
		for {
			c, err := node.Accept(sctx)
			if err != nil {
				return
			}
			if dev != nil {
				// On a party's LAN the node carries members' WireGuard traffic only.
				if !dev.Accept(c) {
					c.Close()
				}
				continue
			}
			wg.Go(func() { a.handle(sctx, c, false, newProber()) })
		}
	})
	if det := node.Detector(); det != nil {
		changes, unsubscribe := det.Subscribe()
		wg.Go(func() {
			defer unsubscribe()
			for {
				select {
				case <-sctx.Done():
					return
				case ch := <-changes:
					a.state.profile(ch.New)
					a.emit(agentEvent{Event: "profile", Profile: &ch.New}, fmt.Sprintf("%s profile changed: %s", stamp(), ch.New))
				}
			}
		})
	}
	b := newBackoff(time.Second, 30*time.Second, reconnectJitter, nil)
	var exitErr error
serving:
	for {
		select {
		case <-sctx.Done():
			break serving // interrupted, or peerlink down
		case <-devDone:
			exitErr = dev.Err()
			break serving
		case <-sigDone:
		}
		a.state.down()
		why := fmt.Errorf("rendezvous connection lost: %w", sig.Err())
		for {
			wait := b.next()
			fmt.Fprintf(a.stderr, "peerlink agent: %v; reconnecting in %v\n", why, wait.Round(time.Millisecond))
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-sctx.Done():
				t.Stop()
				break serving
			}
			fresh, err := a.nf.dial(ctx, a.id, a.log)
			if err == nil {
				if err = node.SetSignal(ctx, fresh); err != nil {
					fresh.Close()
				}
			}
			if err != nil {
				why = err
				continue
			}
			sig.Close()
			sig, sigDone = fresh, fresh.Done()
			dir.c.Store(fresh)
			b.reset()
			announce(false)
			break
		}
	}
	a.state.down()
	dialMu.Lock()
	stopping = true
	dialMu.Unlock()
	// The connections say goodbye to their peers before the node and its signaling go.
	cancel()
	wg.Wait()
	return exitErr
}

// handle serves one connection, accepted or made from the dashboard: it echoes every
// datagram back except the echoes of its own pings, pings the peer every probeInterval
// for the dashboard's figures, and logs the connection's life.
func (a *agent) handle(ctx context.Context, c *connect.Conn, outgoing bool, probe *prober) {
	defer c.Close()
	a.state.add(c, outgoing, probe)
	defer a.state.remove(c)
	peer := c.Peer()
	method, st := c.Method(), c.Stats()
	verb := "connected"
	if outgoing {
		verb = "connected (from the dashboard)"
	}
	a.emit(agentEvent{Event: "connected", Peer: peer.String(), Method: method.String(), Technique: c.Technique().String(), TimeToFirstPathMS: ptr(ms(st.FirstPath)), Outgoing: outgoing},
		fmt.Sprintf("%s peer %s: %s, %s (technique %s) after %v", stamp(), peer, verb, method, c.Technique(), st.FirstPath.Round(time.Microsecond)))

	pctx, stopPings := context.WithCancel(ctx)
	var pings sync.WaitGroup
	defer pings.Wait()
	defer stopPings()
	pings.Go(func() {
		t := time.NewTicker(probeInterval)
		defer t.Stop()
		for {
			c.Send(probe.ping(time.Now())) // ErrNoPath while the path settles: the ping is lost
			select {
			case <-pctx.Done():
				return
			case <-t.C:
			}
		}
	})

	n := 0
	for {
		rctx, cancelRecv := context.WithTimeout(ctx, a.idle)
		b, err := c.Recv(rctx)
		cancelRecv()
		if err != nil {
			reason := err.Error()
			switch {
			case ctx.Err() != nil:
				reason = "agent stopping"
			case errors.Is(err, context.DeadlineExceeded):
				reason = fmt.Sprintf("idle for %v", a.idle)
			case errors.Is(err, connect.ErrClosed):
				reason = "closed by the peer"
			}
			a.emit(agentEvent{Event: "closed", Peer: peer.String(), Datagrams: ptr(n), Reason: reason},
				fmt.Sprintf("%s peer %s: closed after %d datagrams (%s)", stamp(), peer, n, reason))
			return
		}
		if !probe.echo(b, time.Now()) {
			n++
			if err := c.Send(b); err != nil {
				if a.log != nil {
					a.log.Debug("agent: echo failed", "peer", peer.Short(), "err", err)
				}
			} else {
				a.state.echoedOne(c)
			}
		}
		if m := c.Method(); m != method {
			method = m
			d := c.Stats().ToDirect
			a.emit(agentEvent{Event: "upgraded", Peer: peer.String(), Method: m.String(), Technique: c.Technique().String(), TimeToDirectMS: ptr(ms(d))},
				fmt.Sprintf("%s peer %s: now %s after %v", stamp(), peer, m, d.Round(time.Microsecond)))
			a.state.changes.notify()
		}
	}
}

func stamp() string { return time.Now().Format("15:04:05") }
