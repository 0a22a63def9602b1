package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/nat"
	"peerlink/portmap"
	"peerlink/relay"
	"peerlink/relayreg"
	"peerlink/signal"
)

// nodeFlags are the flags every command that runs a node shares (connect, agent), with
// their PEERLINK_* environment equivalents.
type nodeFlags struct {
	server         string
	identity       string
	stun           stringList
	relay          string
	relayUser      string
	relayPass      string
	relayTransport string
	relayAuto      bool // relay was found in the rendezvous server's registry
	lan            bool // find and be found on the local link over mDNS
	portmap        bool // ask the gateway for a port mapping
	json           bool
	verbose        bool
}

func (f *nodeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.server, "server", "", "rendezvous server URL, ws:// or wss:// (default $PEERLINK_SERVER)")
	fs.StringVar(&f.identity, "identity", "", "identity key file (default $PEERLINK_IDENTITY, else peerlink/identity.key in the user's config directory)")
	fs.Var(&f.stun, "stun", "STUN server HOST:PORT, RFC 5780 one first (repeatable; default $PEERLINK_STUN, comma separated)")
	fs.StringVar(&f.relay, "relay", "", "TURN relay HOST:PORT to fall back on (default $PEERLINK_RELAY, else the best relay registered with the rendezvous server; \"none\": no relaying)")
	fs.StringVar(&f.relayUser, "relay-user", "", "relay user name (default $PEERLINK_RELAY_USER; none: short-lived credentials from the rendezvous server)")
	fs.StringVar(&f.relayPass, "relay-pass", "", "relay password (default $PEERLINK_RELAY_PASS, which keeps it out of the process list)")
	fs.StringVar(&f.relayTransport, "relay-transport", "udp", "how to reach the relay: udp, tcp or tls")
	fs.BoolVar(&f.lan, "lan", false, "find and be found by nodes on the local network over mDNS, with or without a rendezvous server (default $PEERLINK_LAN=1)")
	fs.BoolVar(&f.portmap, "portmap", false, "ask the router for a port mapping (PCP, NAT-PMP or UPnP IGD) so peers reach this node directly even behind a NAT that cannot be punched (default $PEERLINK_PORTMAP=1)")
	fs.BoolVar(&f.json, "json", false, "print results as JSON")
	fs.BoolVar(&f.verbose, "v", false, "debug logging on stderr")
}

// resolve fills unset flags from the environment and checks them; its errors wrap
// errUsage.
func (f *nodeFlags) resolve() error {
	f.server = cmpOr(f.server, os.Getenv("PEERLINK_SERVER"))
	f.relay = cmpOr(f.relay, os.Getenv("PEERLINK_RELAY"))
	f.relayUser = cmpOr(f.relayUser, os.Getenv("PEERLINK_RELAY_USER"))
	f.relayPass = cmpOr(f.relayPass, os.Getenv("PEERLINK_RELAY_PASS"))
	f.lan = f.lan || os.Getenv("PEERLINK_LAN") == "1"
	f.portmap = f.portmap || os.Getenv("PEERLINK_PORTMAP") == "1"
	if len(f.stun) == 0 {
		for s := range strings.SplitSeq(os.Getenv("PEERLINK_STUN"), ",") {
			if s = strings.TrimSpace(s); s != "" {
				f.stun = append(f.stun, s)
			}
		}
	}
	switch {
	case f.server == "" && !f.lan:
		return fmt.Errorf("%w: no rendezvous server: pass --server URL or set PEERLINK_SERVER (run 'peerlink rendezvous' for one), or --lan for the local network only", errUsage)
	case len(f.stun) == 0 && !f.lan:
		return fmt.Errorf("%w: no STUN servers: pass --stun HOST:PORT or set PEERLINK_STUN (run 'peerlink stun' for one)", errUsage)
	case f.relayUser != "" && f.relayPass == "":
		return fmt.Errorf("%w: --relay-user needs --relay-pass (or PEERLINK_RELAY_PASS)", errUsage)
	}
	switch relay.Transport(f.relayTransport) {
	case relay.UDP, relay.TCP, relay.TLS:
	default:
		return fmt.Errorf("%w: --relay-transport %q: want udp, tcp or tls", errUsage, f.relayTransport)
	}
	return nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func (f *nodeFlags) loadIdentity() (*identity.Identity, error) {
	p := f.identity
	if p == "" {
		var err error
		if p, err = identity.DefaultPath(); err != nil {
			return nil, err
		}
	}
	return identity.LoadOrCreate(p)
}

func (f *nodeFlags) logger(stderr io.Writer) *slog.Logger {
	if !f.verbose {
		return nil
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// dial connects to the rendezvous server.
//
// With --lan and no --server it returns a nil client: the node is on the local network
// only.
func (f *nodeFlags) dial(ctx context.Context, id *identity.Identity, log *slog.Logger) (*signal.Client, error) {
	if f.server == "" && f.lan {
		return nil, nil
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	sig, err := signal.Dial(dctx, f.server, id, &signal.Options{Logger: log})
	if err != nil {
		return nil, fmt.Errorf("cannot reach the rendezvous server %s: %w (check --server or PEERLINK_SERVER; run 'peerlink rendezvous' for one)", f.server, err)
	}
	return sig, nil
}

// startNode profiles the NAT and starts a node on sig.
func (f *nodeFlags) startNode(ctx context.Context, id *identity.Identity, sig *signal.Client, log *slog.Logger) (*connect.Node, error) {
	stunAddrs, err := resolveSTUN(ctx, f.stun)
	if err != nil {
		return nil, err
	}
	// A long-lived node follows the host across networks (Wi-Fi to cable, a new lease).
	cfg := connect.Config{Identity: id, Signal: sig, STUN: stunAddrs, Logger: log, WatchNetwork: true}
	if f.lan {
		cfg.LAN = &connect.LANConfig{}
	}
	if f.portmap {
		cfg.PortMap = &portmap.Config{Logger: log}
	}
	if f.relay == "" && sig != nil {
		f.findRelay(ctx, sig, log)
	}
	if f.relay != "" && f.relay != "none" {
		cfg.Relay = &connect.RelayConfig{Server: f.relay, Transport: relay.Transport(f.relayTransport), Username: f.relayUser, Password: f.relayPass}
	}
	node, err := connect.Start(ctx, cfg)
	switch {
	case err == nil:
		return node, nil
	case errors.Is(err, connect.ErrNoObservers), errors.Is(err, connect.ErrDetectionTimeout):
		return nil, fmt.Errorf("profiling the NAT failed: no usable answer from the STUN servers %s: %w (check --stun; run 'peerlink stun' for one)", strings.Join(f.stun, ", "), err)
	}
	return nil, fmt.Errorf("starting the node: %w", err)
}

// findRelay picks the relay with the lowest latency and load among those registered
// with the rendezvous server; the node then gets short-lived credentials for it from the
// server. With none registered (or none answering) the node has no relay.
func (f *nodeFlags) findRelay(ctx context.Context, sig *signal.Client, log *slog.Logger) {
	fctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	fd := &relayreg.Finder{Source: sig, Transports: []relayreg.Transport{relayreg.Transport(f.relayTransport)}, Logger: log}
	ch, err := fd.FindRelay(fctx, identity.NodeID{})
	if err != nil {
		if log != nil {
			log.Debug("no registered relay", "err", err)
		}
		return
	}
	f.relay, f.relayAuto = ch.Endpoint.Addr, true
	if log != nil {
		log.Debug("using a registered relay", "relay", ch.NodeID.Short(), "endpoint", ch.Endpoint, "latency", ch.Latency, "load", ch.Load)
	}
}

// resolveSTUN turns HOST[:PORT] into IPv4 ip:port, which is what NAT profiling needs.
func resolveSTUN(ctx context.Context, servers []string) ([]string, error) {
	out := make([]string, 0, len(servers))
	for _, s := range servers {
		if ap, err := netip.ParseAddrPort(s); err == nil {
			out = append(out, ap.String())
			continue
		}
		host, port, err := net.SplitHostPort(s)
		if err != nil {
			host, port = s, "3478"
		}
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip4", host)
		if err != nil || len(ips) == 0 {
			return nil, fmt.Errorf("STUN server %q: cannot resolve %q to an IPv4 address: %v", s, host, err)
		}
		out = append(out, net.JoinHostPort(ips[0].Unmap().String(), port))
	}
	return out, nil
}

// published is what the rendezvous server holds for node: its profile and candidates.
func published(ctx context.Context, sig *signal.Client, node identity.NodeID) *signal.ConnectionInfo {
	if sig == nil {
		return nil
	}
	lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	p, err := sig.Lookup(lctx, node)
	if err != nil {
		return nil
	}
	return p.Info
}

func candidateStrings(info *signal.ConnectionInfo) []string {
	if info == nil {
		return nil
	}
	out := make([]string, 0, len(info.Candidates))
	for _, c := range info.Candidates {
		out = append(out, c.Type.String()+" "+c.AddrPort().String())
	}
	return out
}

func hasRelayed(info *signal.ConnectionInfo) bool {
	if info == nil {
		return false
	}
	for _, c := range info.Candidates {
		if c.Type == signal.CandidateRelayed {
			return true
		}
	}
	return false
}

// profileOf is the profile a node published, with the reflexive address of its main
// socket, as the node plans with it.
func profileOf(info *signal.ConnectionInfo) nat.Profile {
	var p nat.Profile
	if info == nil {
		return p
	}
	if info.Profile != nil {
		p = *info.Profile
	}
	if info.PublicIP.IsValid() {
		p.PublicIP, p.PublicPort = info.PublicIP, info.PublicPort
	}
	return p
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// connectJSON is connect's --json output.
type connectJSON struct {
	Node              string       `json:"node"`
	Peer              string       `json:"peer"`
	Method            string       `json:"method,omitempty"`
	Technique         string       `json:"technique,omitempty"`
	Plan              string       `json:"plan,omitempty"`
	TimeToFirstPathMS *float64     `json:"time_to_first_path_ms,omitempty"`
	TimeToFirstByteMS *float64     `json:"time_to_first_byte_ms,omitempty"`
	TimeToDirectMS    *float64     `json:"time_to_direct_ms"`
	RTTMS             *float64     `json:"rtt_ms,omitempty"`
	Profile           *nat.Profile `json:"profile,omitempty"`
	PeerProfile       *nat.Profile `json:"peer_profile,omitempty"`
	Error             string       `json:"error,omitempty"`
	ErrorKind         string       `json:"error_kind,omitempty"`
}

func runConnect(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink connect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	timeout := fs.Duration("timeout", 10*time.Second, "give up when no path works within this long")
	noRelay := fs.Bool("no-relay", false, "never relay: fail when no direct or punched path works")
	noDirect := fs.Bool("no-direct", false, "stay on the relay: no hole punching")
	directWait := fs.Duration("direct-wait", 5*time.Second, "after a relayed start, how long to wait for the upgrade to a direct path")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink connect [--server URL] [--identity FILE] [--stun HOST:PORT ...] [--relay HOST:PORT]
       [--timeout D] [--no-relay] [--no-direct] [--json] <node>

Connects to the peerlink node <node> (its NodeID, as 'peerlink id' prints it), which
runs 'peerlink agent', and reports how: the NAT profile detected here, the candidates
published, the technique planned, the method that worked (direct, punched or relayed)
and how long it took. It sends a datagram and waits for the agent's echo (time to first
byte), and waits up to --direct-wait for a relayed connection to move to a direct path.
Progress goes to stderr; the result to stdout.

Exit status: 0 connected, 1 failed (the message says why and what to do), 2 bad usage.

Examples:
  peerlink connect --server ws://rv.example:8080/ --stun 198.51.100.2:3478 pl4bq...
  PEERLINK_SERVER=wss://rv.example/ PEERLINK_STUN=198.51.100.2:3478 peerlink connect --json pl4bq...
  peerlink connect --relay relay.example:3478 --no-direct pl4bq...
  peerlink connect --lan pl4bq...          # a node on the local network, found over mDNS

Flags:
`)
		fs.PrintDefaults()
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: want exactly one <node> (a NodeID, as 'peerlink id' prints it), got %d arguments", errUsage, len(pos))
	}
	target, err := identity.ParseNodeID(pos[0])
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *noRelay && *noDirect {
		return fmt.Errorf("%w: --no-relay and --no-direct together leave no way to connect", errUsage)
	}
	if *timeout <= 0 || *directWait < 0 {
		return fmt.Errorf("%w: --timeout must be positive and --direct-wait not negative", errUsage)
	}
	if err := nf.resolve(); err != nil {
		return err
	}
	if *noDirect && nf.relay == "none" {
		return fmt.Errorf("%w: --no-direct needs a relay: pass --relay HOST:PORT or set PEERLINK_RELAY, or leave it unset to use one registered with the rendezvous server", errUsage)
	}
	id, err := nf.loadIdentity()
	if err != nil {
		return err
	}
	if target == id.NodeID() {
		return fmt.Errorf("%w: %s is this node's own NodeID (use another --identity for one of the two ends)", errUsage, target.Short())
	}
	c := &connector{
		nf: nf, id: id, target: target, stderr: stderr, log: nf.logger(stderr),
		opts:       connect.Options{Timeout: *timeout, NoRelay: *noRelay, NoDirect: *noDirect},
		directWait: *directWait,
		out:        connectJSON{Node: id.NodeID().String(), Peer: target.String()},
	}
	kind, err := c.run(ctx)
	if err != nil {
		c.out.Error, c.out.ErrorKind = err.Error(), kind
	}
	if nf.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(c.out); jerr != nil && err == nil {
			return jerr
		}
	} else if err == nil {
		c.summary(stdout)
	}
	return err
}

// connector is one run of peerlink connect.
type connector struct {
	nf         nodeFlags
	id         *identity.Identity
	target     identity.NodeID
	opts       connect.Options
	directWait time.Duration
	stderr     io.Writer
	log        *slog.Logger
	out        connectJSON
}

func (c *connector) progress(format string, args ...any) {
	fmt.Fprintf(c.stderr, format+"\n", args...)
}

// run connects and measures. On failure it returns the error kind (for --json) and an
// error that says what went wrong and what to do.
func (c *connector) run(ctx context.Context) (string, error) {
	sig, err := c.nf.dial(ctx, c.id, c.log)
	if err != nil {
		return "rendezvous_unreachable", err
	}
	var peer *signal.Peer
	lerr := errors.New("no rendezvous server")
	if sig != nil {
		defer sig.Close()
		c.progress("rendezvous: %s as %s", c.nf.server, c.id.NodeID().Short())
		// An offline peer fails at once, before the NAT profiling that would only delay
		// it — unless it may be on the local network.
		lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		peer, lerr = sig.Lookup(lctx, c.target)
		cancel()
		if !c.nf.lan && (errors.Is(lerr, signal.ErrNotFound) || (lerr == nil && !peer.Online)) {
			return "peer_offline", c.offline()
		}
	} else {
		c.progress("local network only (mDNS) as %s", c.id.NodeID().Short())
	}

	start := time.Now()
	node, err := c.nf.startNode(ctx, c.id, sig, c.log)
	if err != nil {
		return "nat_detection", err
	}
	defer node.Close()
	own := published(ctx, sig, c.id.NodeID())
	prof := node.Profile()
	if own != nil {
		prof = profileOf(own) // with the main socket's reflexive address
	}
	c.out.Profile = &prof
	c.progress("profile: %s (node up in %v)", prof, time.Since(start).Round(time.Millisecond))
	c.progress("candidates: %s", strings.Join(candidateStrings(own), ", "))
	if c.nf.relayAuto {
		c.progress("relay: %s, registered with the rendezvous server", c.nf.relay)
	}
	if c.nf.relay != "" && c.nf.relay != "none" && !hasRelayed(own) {
		c.progress("relay: no allocation on %s yet (retrying when connecting)", c.nf.relay)
	}
	var theirs *signal.ConnectionInfo
	if lerr == nil {
		theirs = peer.Info
	}
	if theirs != nil {
		pp := profileOf(theirs)
		c.out.PeerProfile = &pp
		c.progress("peer %s: %s; candidates: %s", c.target.Short(), pp, strings.Join(candidateStrings(theirs), ", "))
		plan := nat.Strategy(profileOf(own), pp)
		c.out.Plan = plan.String()
		c.progress("plan: %s", plan)
	}

	c.progress("connecting to %s...", c.target.Short())
	start = time.Now()
	conn, err := node.Connect(ctx, c.target, c.opts)
	if err != nil {
		return c.explain(err, own, theirs)
	}
	defer conn.Close()
	st := conn.Stats()
	c.out.Method, c.out.Technique = conn.Method().String(), conn.Technique().String()
	c.out.TimeToFirstPathMS = ptr(ms(st.FirstPath))
	c.progress("path up: %s (technique %s) after %v", conn.Method(), conn.Technique(), st.FirstPath.Round(time.Microsecond))

	deadline := start.Add(c.opts.Timeout)
	ectx, cancel := context.WithDeadline(ctx, deadline)
	arrived, err := echo(ectx, conn)
	cancel()
	if err != nil {
		return "no_echo", fmt.Errorf("connected to %s (%s), but it never echoed a datagram within %v: %w (is it running 'peerlink agent'?)", c.target.Short(), conn.Method(), c.opts.Timeout, err)
	}
	c.out.TimeToFirstByteMS = ptr(ms(arrived.Sub(start)))
	c.progress("first byte: %v", arrived.Sub(start).Round(time.Microsecond))

	c.awaitDirect(ctx, node, conn)
	c.out.Method = conn.Method().String()
	if d := conn.Stats().ToDirect; d > 0 {
		c.out.TimeToDirectMS = ptr(ms(d))
	}
	// One more echo over the path the connection settled on.
	ectx, cancel = context.WithTimeout(ctx, 2*time.Second)
	sent := time.Now()
	if arrived, err := echo(ectx, conn); err == nil {
		c.out.RTTMS = ptr(ms(arrived.Sub(sent)))
	}
	cancel()
	return "", nil
}

// awaitDirect waits, up to directWait, for a relayed connection whose plan can give a
// direct path to get it, reporting the upgrade.
func (c *connector) awaitDirect(ctx context.Context, node *connect.Node, conn *connect.Conn) {
	if !conn.Method().Relayed() || c.opts.NoDirect || conn.Technique() == nat.Relay {
		return
	}
	c.progress("waiting up to %v for a direct path (%s)...", c.directWait, conn.Technique())
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	limit := time.NewTimer(c.directWait)
	defer limit.Stop()
	for conn.Method().Relayed() && pending(node, c.target) {
		select {
		case <-ctx.Done():
			return
		case <-limit.C:
			c.progress("no direct path within %v: staying relayed", c.directWait)
			return
		case <-t.C:
		}
	}
	if m := conn.Method(); !m.Relayed() {
		c.progress("direct: %s after %v", m, conn.Stats().ToDirect.Round(time.Microsecond))
	} else {
		c.progress("no direct path (%s failed): staying relayed", conn.Technique())
	}
}

// pending reports whether the node is still trying for a direct path to peer.
func pending(node *connect.Node, peer identity.NodeID) bool {
	for _, a := range node.Pending() {
		if a.Peer == peer && a.Initiator {
			return true
		}
	}
	return false
}

// echo sends a probe datagram until the peer echoes it back, and returns when the echo
// arrived. Datagrams can be lost while paths settle, hence the resending.
func echo(ctx context.Context, conn *connect.Conn) (time.Time, error) {
	var nonce [8]byte
	rand.Read(nonce[:])
	probe := []byte("peerlink-probe " + hex.EncodeToString(nonce[:]))
	for {
		conn.Send(probe) // ErrNoPath while the path settles: try again
		rctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		for {
			b, err := conn.Recv(rctx)
			if err == nil && bytes.Equal(b, probe) {
				cancel()
				return time.Now(), nil
			}
			if err != nil {
				break
			}
		}
		cancel()
		if err := ctx.Err(); err != nil {
			return time.Time{}, err
		}
	}
}

// explain turns a Connect error into what went wrong and what to do.
func (c *connector) explain(err error, own, theirs *signal.ConnectionInfo) (string, error) {
	peer := c.target.Short()
	switch {
	case errors.Is(err, connect.ErrPeerOffline):
		return "peer_offline", c.offline()
	case errors.Is(err, connect.ErrSymmetricNAT):
		return "symmetric_nat", fmt.Errorf("both peers are behind symmetric NATs and relay is disabled: enable relay (drop --no-relay, pass --relay HOST:PORT) or run 'peerlink relay' (%v)", err)
	case errors.Is(err, connect.ErrNoRelay) && (c.nf.relay == "" || c.nf.relay == "none"):
		return "no_relay", fmt.Errorf("no direct path to %s and no relay to fall back on: pass --relay HOST:PORT or set PEERLINK_RELAY (run 'peerlink relay' for one) (%v)", peer, err)
	case errors.Is(err, connect.ErrNoRelay) && hasRelayed(own) && !hasRelayed(theirs):
		return "no_relay", fmt.Errorf("no direct path to %s, and it has no relay allocation: start its agent with --relay HOST:PORT (%v)", peer, err)
	case errors.Is(err, connect.ErrNoRelay):
		return "no_relay", fmt.Errorf("no direct path to %s, and the relay %s failed: %v: check that it runs and is reachable over %s, and the credentials (--relay-user/--relay-pass, or the rendezvous server's --turn-secret)", peer, c.nf.relay, err, c.nf.relayTransport)
	case errors.Is(err, connect.ErrPunchFailed):
		return "punch_failed", fmt.Errorf("hole punching to %s failed and relay is disabled: drop --no-relay and pass --relay HOST:PORT, or run 'peerlink relay' (%v)", peer, err)
	case errors.Is(err, connect.ErrTimeout):
		return "timeout", fmt.Errorf("no path to %s within %v: %v: it may not be reachable over UDP; pass --relay HOST:PORT, or a longer --timeout", peer, c.opts.Timeout, err)
	}
	return "failed", fmt.Errorf("connecting to %s: %w", peer, err)
}

func (c *connector) offline() error {
	return fmt.Errorf("%w: peer %s is not connected to the rendezvous server %s: start 'peerlink agent' on it with the same --server, then try again", connect.ErrPeerOffline, c.target, c.nf.server)
}

func (c *connector) summary(w io.Writer) {
	o := c.out
	fmt.Fprintf(w, "connected to %s: %s (technique %s)\n", o.Peer, o.Method, o.Technique)
	if o.Plan != "" {
		fmt.Fprintf(w, "  plan:          %s\n", o.Plan)
	}
	if o.Profile != nil {
		fmt.Fprintf(w, "  local NAT:     %s\n", o.Profile)
	}
	if o.PeerProfile != nil {
		fmt.Fprintf(w, "  peer NAT:      %s\n", o.PeerProfile)
	}
	fmt.Fprintf(w, "  first path:    %s\n", msText(o.TimeToFirstPathMS, ""))
	fmt.Fprintf(w, "  first byte:    %s\n", msText(o.TimeToFirstByteMS, ""))
	fmt.Fprintf(w, "  direct path:   %s\n", msText(o.TimeToDirectMS, "none (relayed)"))
	fmt.Fprintf(w, "  round trip:    %s\n", msText(o.RTTMS, "no echo"))
}

func msText(v *float64, none string) string {
	if v == nil {
		return none
	}
	return fmt.Sprintf("%.1f ms", *v)
}

func ptr[T any](v T) *T { return &v }

// parseInterspersed parses flags that may come before or after positional arguments
// ("connect <node> --json"), and returns the positional ones. "--" ends the flags. Its
// errors are flag.ErrHelp for -h, and wrap errUsage otherwise.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if i := len(args) - len(rest); i > 0 && args[i-1] == "--" {
			return append(pos, rest...), nil
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
}
