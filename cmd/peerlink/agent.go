package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/nat"
)

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	idle := fs.Duration("idle", 5*time.Minute, "close a connection that carries nothing for this long")
	httpAddr := fs.String("http", "", "serve the agent's status (GET /api/status, JSON) and Prometheus /metrics on this address, e.g. 127.0.0.1:7474")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink agent [--server URL] [--identity FILE] [--stun HOST:PORT ...] [--relay HOST:PORT]
       [--relay-user U --relay-pass P] [--idle D] [--lan] [--http ADDR] [--json]

Runs a peerlink node that accepts connections until interrupted: it profiles the NAT,
publishes its candidates on the rendezvous server, prints its NodeID and profile, and
logs every connection (peer, method, technique). It echoes each datagram back to its
sender, which is what 'peerlink connect' measures. When the rendezvous connection drops
it reconnects, waiting longer after each failure (up to 30 s).

With --json, stdout carries one JSON object per line: "ready" (node, profile,
candidates), then "connected", "upgraded" and "closed" for each connection.

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
	if *httpAddr != "" {
		ln, err := net.Listen("tcp", *httpAddr)
		if err != nil {
			return fmt.Errorf("agent HTTP API: %w (is --http %s free?)", err, *httpAddr)
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

// run serves until ctx ends, reconnecting to the rendezvous server when the connection
// drops. Only a failure to start at all is an error.
func (a *agent) run(ctx context.Context) error {
	const maxBackoff = 30 * time.Second
	backoff := time.Second
	everUp := false
	for {
		up, err := a.serve(ctx, !everUp)
		if ctx.Err() != nil {
			return nil
		}
		if !everUp && !up {
			return err
		}
		everUp = true
		if up {
			backoff = time.Second
		}
		fmt.Fprintf(a.stderr, "peerlink agent: %v; reconnecting in %v\n", err, backoff)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// serve runs one rendezvous connection and node: it accepts connections until ctx ends
// or the rendezvous connection drops. up reports whether the node got as far as
// accepting.
func (a *agent) serve(ctx context.Context, first bool) (up bool, err error) {
	sig, err := a.nf.dial(ctx, a.id, a.log)
	if err != nil {
		return false, err
	}
	var sigDone <-chan struct{} // nil (never ready) on the local network only
	if sig != nil {
		defer sig.Close()
		sigDone = sig.Done()
	}
	node, err := a.nf.startNode(ctx, a.id, sig, a.log)
	if err != nil {
		return false, err
	}
	defer node.Close()

	// The ready line lists the relayed candidate when there is a relay: wait for the
	// allocation begun at start (it gives up on its own after a few seconds).
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	if err := node.WaitRelay(wctx); err != nil && !errors.Is(err, connect.ErrNoRelay) {
		fmt.Fprintf(a.stderr, "peerlink agent: relay: %v\n", err)
	}
	wcancel()
	own := published(ctx, sig, a.id.NodeID())
	prof := node.Profile()
	if own != nil {
		prof = profileOf(own) // with the main socket's reflexive address
	}
	cands := candidateStrings(own)
	a.state.node(a.id.NodeID().String(), a.nf.server, &prof, cands)
	if first {
		a.emit(agentEvent{Event: "ready", Node: a.id.NodeID().String(), Server: a.nf.server, Profile: &prof, Candidates: cands, HTTP: a.httpURL},
			fmt.Sprintf("node: %s\nprofile: %s\ncandidates: %s\naccepting connections via %s (Ctrl-C to stop)",
				a.id.NodeID(), prof, strings.Join(cands, ", "), cmpOr(a.nf.server, "the local network (mDNS)")))
	} else {
		a.emit(agentEvent{Event: "reconnected", Node: a.id.NodeID().String(), Server: a.nf.server, Profile: &prof, Candidates: cands},
			fmt.Sprintf("%s reconnected to %s; profile: %s", stamp(), a.nf.server, prof))
	}

	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := node.Accept(sctx)
			if err != nil {
				return
			}
			wg.Go(func() { a.handle(sctx, c) })
		}
	})
	select {
	case <-ctx.Done():
	case <-sigDone:
		err = fmt.Errorf("rendezvous connection lost: %w", sig.Err())
	}
	// The connections say goodbye to their peers before the node and its signaling go.
	cancel()
	wg.Wait()
	return true, err
}

// handle serves one accepted connection: it echoes every datagram back and logs the
// connection's life.
func (a *agent) handle(ctx context.Context, c *connect.Conn) {
	defer c.Close()
	a.state.add(c)
	defer a.state.remove(c)
	peer := c.Peer()
	method, st := c.Method(), c.Stats()
	a.emit(agentEvent{Event: "connected", Peer: peer.String(), Method: method.String(), Technique: c.Technique().String(), TimeToFirstPathMS: ptr(ms(st.FirstPath))},
		fmt.Sprintf("%s peer %s: connected, %s (technique %s) after %v", stamp(), peer, method, c.Technique(), st.FirstPath.Round(time.Microsecond)))
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
		n++
		if err := c.Send(b); err != nil {
			if a.log != nil {
				a.log.Debug("agent: echo failed", "peer", peer.Short(), "err", err)
			}
		} else {
			a.state.echoedOne(c)
		}
		if m := c.Method(); m != method {
			method = m
			d := c.Stats().ToDirect
			a.emit(agentEvent{Event: "upgraded", Peer: peer.String(), Method: m.String(), Technique: c.Technique().String(), TimeToDirectMS: ptr(ms(d))},
				fmt.Sprintf("%s peer %s: now %s after %v", stamp(), peer, m, d.Round(time.Microsecond)))
		}
	}
}

func stamp() string { return time.Now().Format("15:04:05") }
