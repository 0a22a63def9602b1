package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/party"
	"peerlink/partynet"
	"peerlink/signal"
)

// runParty manages parties on the rendezvous server: create, invite, join, leave,
// kick, list.
func runParty(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink party", flag.ContinueOnError)
	fs.SetOutput(stderr)
	server := fs.String("server", "", "rendezvous server URL (default $PEERLINK_SERVER)")
	idPath := fs.String("identity", "", "identity key file (default $PEERLINK_IDENTITY, else the user's config directory)")
	ttl := fs.Duration("ttl", 24*time.Hour, "invite: how long the token lets nodes join")
	asJSON := fs.Bool("json", false, "print results as JSON")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink party create NAME
       peerlink party invite NAME [--ttl 24h]
       peerlink party join TOKEN
       peerlink party leave NAME
       peerlink party kick NAME NODEID
       peerlink party list [NAME]
  (each with [--server URL] [--identity FILE] [--json])

A party is a named group of nodes with a virtual LAN ('peerlink up --party NAME'): the
rendezvous server gives each member a stable IPv4 address in the party's subnet (inside
100.64.0.0/10) and an IPv6 unique-local address, and lets members, and only members,
find and signal each other.

  create  makes a party; this node owns it and is its first member.
  invite  prints a token that lets a node join until it expires; any member may
          invite, and the token is signed by this node.
  join    joins with a token, and prints this node's addresses.
  leave   leaves (the oldest remaining member becomes owner if the owner leaves).
  kick    removes a member (owner only).
  list    lists this node's parties, or one party's members with their status.

Examples:
  peerlink party create lan-night
  peerlink party invite lan-night --ttl 2h
  peerlink party join plinv1.eyJ…
  peerlink party list lan-night

Flags:
`)
		fs.PrintDefaults()
	}
	if len(args) == 0 {
		fs.Usage()
		return fmt.Errorf("%w: missing subcommand", errUsage)
	}
	sub := args[0]
	if sub == "-h" || sub == "--help" {
		fs.Usage()
		return flag.ErrHelp
	}
	pos, err := parseInterspersed(fs, args[1:])
	if err != nil {
		return err
	}
	want := map[string]int{"create": 1, "invite": 1, "join": 1, "leave": 1, "kick": 2, "list": -1}
	n, ok := want[sub]
	switch {
	case !ok:
		return fmt.Errorf("%w: unknown subcommand %q (want create, invite, join, leave, kick or list)", errUsage, sub)
	case n >= 0 && len(pos) != n:
		return fmt.Errorf("%w: party %s takes %d argument(s)", errUsage, sub, n)
	case n < 0 && len(pos) > 1:
		return fmt.Errorf("%w: party list takes at most one party name", errUsage)
	}
	nf := nodeFlags{server: *server, identity: *idPath}
	nf.server = cmpOr(nf.server, os.Getenv("PEERLINK_SERVER"))
	if nf.server == "" {
		return fmt.Errorf("%w: no rendezvous server: pass --server URL or set PEERLINK_SERVER", errUsage)
	}
	id, err := nf.loadIdentity()
	if err != nil {
		return err
	}
	if sub == "invite" {
		// The token is signed here; the server checks it when someone joins.
		now := time.Now()
		tok, err := party.NewInvite(id, arg(pos, 0), *ttl, now)
		if err != nil {
			return err
		}
		return printResult(stdout, *asJSON, map[string]any{"party": arg(pos, 0), "token": tok, "expires": now.Add(*ttl).UTC()}, tok)
	}
	sig, err := nf.dial(ctx, id, nil)
	if err != nil {
		return err
	}
	defer sig.Close()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	switch sub {
	case "create":
		p, err := sig.CreateParty(ctx, arg(pos, 0))
		if err != nil {
			return err
		}
		return printParty(stdout, *asJSON, p, id.NodeID(), "created")
	case "join":
		p, err := sig.JoinParty(ctx, arg(pos, 0)) // the server ignores spaces around a pasted token
		if err != nil {
			return err
		}
		return printParty(stdout, *asJSON, p, id.NodeID(), "joined")
	case "leave":
		if err := sig.LeaveParty(ctx, arg(pos, 0)); err != nil {
			return err
		}
		return printResult(stdout, *asJSON, map[string]any{"party": arg(pos, 0), "left": true}, "left party "+arg(pos, 0))
	case "kick":
		node, err := identity.ParseNodeID(arg(pos, 1))
		if err != nil {
			return fmt.Errorf("%w: NODEID: %v", errUsage, err)
		}
		if err := sig.KickFromParty(ctx, arg(pos, 0), node); err != nil {
			return err
		}
		return printResult(stdout, *asJSON, map[string]any{"party": arg(pos, 0), "kicked": node}, "kicked "+node.String()+" from "+arg(pos, 0))
	}
	if len(pos) == 0 {
		names, err := sig.Parties(ctx)
		if err != nil {
			return err
		}
		if names == nil {
			names = []string{}
		}
		return printResult(stdout, *asJSON, map[string]any{"parties": names}, strings.Join(names, "\n"))
	}
	p, err := sig.Party(ctx, arg(pos, 0))
	if err != nil {
		return err
	}
	return printParty(stdout, *asJSON, p, id.NodeID(), "")
}

func arg(pos []string, i int) string {
	if i < len(pos) {
		return pos[i]
	}
	return ""
}

func printResult(w io.Writer, asJSON bool, v any, text string) error {
	if asJSON {
		return json.NewEncoder(w).Encode(v)
	}
	if text != "" {
		fmt.Fprintln(w, text)
	}
	return nil
}

// printParty prints a party and its members, marking this node.
func printParty(w io.Writer, asJSON bool, p *party.Party, me identity.NodeID, verb string) error {
	if asJSON {
		return json.NewEncoder(w).Encode(p)
	}
	if verb != "" {
		if m, ok := p.Member(me); ok {
			fmt.Fprintf(w, "%s party %s: this node is %s and %s\n", verb, p.Name, m.IPv4, m.IPv6)
		}
	}
	fmt.Fprintf(w, "party %s (subnets %s, %s), owner %s\n", p.Name, p.Prefix4, p.Prefix6, p.Owner.Short())
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tIPV4\tIPV6\tSTATUS")
	for _, m := range p.Members {
		status := "offline"
		switch {
		case m.NodeID == me:
			status = "this node"
		case m.Online:
			status = "online"
		case !m.LastSeen.IsZero():
			status = "offline, seen " + m.LastSeen.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", m.NodeID, m.IPv4, m.IPv6, status)
	}
	return tw.Flush()
}

// sigDirectory is the party device's view of the rendezvous server: whichever client
// the agent has now (it replaces it on reconnect).
type sigDirectory struct{ c atomic.Pointer[signal.Client] }

func (d *sigDirectory) Party(ctx context.Context, name string) (*party.Party, error) {
	return d.c.Load().Party(ctx, name)
}

func (d *sigDirectory) Lookup(ctx context.Context, node identity.NodeID) (*signal.Peer, error) {
	return d.c.Load().Lookup(ctx, node)
}

// partyOpts are peerlink up's party flags.
type partyOpts struct {
	name, invite, iface, control string
	mtu                          int
	fwd                          partynet.Forward
}

// runUp runs the agent with a party's virtual LAN.
func runUp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink up", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	var po partyOpts
	fs.StringVar(&po.name, "party", "", "the party whose virtual LAN to join (required)")
	fs.StringVar(&po.invite, "invite", "", "join the party with this invite token first")
	fs.StringVar(&po.iface, "interface", "", "TUN interface name (default pl-PARTY)")
	fs.IntVar(&po.mtu, "mtu", 0, "the interface's MTU (default 1380)")
	fs.StringVar(&po.control, "control", "", "control socket for 'peerlink status' and 'peerlink down' (default "+controlPath("PARTY")+")")
	noFwd := fs.Bool("no-broadcast", false, "do not forward broadcasts and discovery multicasts to the other members")
	fs.BoolVar(&po.fwd.AllMulticast, "all-multicast", false, "forward every IPv4 multicast group, not only the discovery groups (mDNS, LLMNR, SSDP, SLP)")
	httpAddr := fs.String("http", "", "serve the dashboard, status API and /metrics on this address, as 'peerlink agent --http'")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink up --party NAME [--invite TOKEN] [--server URL] [--stun HOST:PORT ...]
       [--interface NAME] [--mtu N] [--no-broadcast] [--all-multicast] [--control PATH] [--http ADDR]

Joins this machine to a party's virtual LAN and stays up until Ctrl-C, SIGTERM or
'peerlink down': it runs a peerlink node (as 'peerlink agent' does), creates a TUN
interface with this member's virtual IPv4 and IPv6 addresses, and runs WireGuard over
peerlink connections to the other members — direct, hole-punched or relayed, and
following the best path as it changes. Any program can then reach members by their
virtual IPs; LAN games find each other because broadcasts and discovery multicasts
reach every member. Needs root or CAP_NET_ADMIN.

Examples:
  peerlink party create lan-night && peerlink up --party lan-night
  peerlink up --party lan-night --invite plinv1.eyJ…   # join and come up
  peerlink status; peerlink down

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
	po.fwd.Off = *noFwd
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	case po.name == "" && po.invite != "":
		inv, err := party.ParseInvite(po.invite)
		if err != nil {
			return err
		}
		po.name = inv.Party
	case po.name == "":
		return fmt.Errorf("%w: --party NAME is required", errUsage)
	}
	if err := party.ValidName(po.name); err != nil {
		return fmt.Errorf("%w: --party: %v", errUsage, err)
	}
	if err := nf.resolve(); err != nil {
		return err
	}
	if nf.server == "" {
		return fmt.Errorf("%w: a party needs a rendezvous server (--server URL or PEERLINK_SERVER)", errUsage)
	}
	if po.control == "" {
		po.control = controlPath(po.name)
	}
	id, err := nf.loadIdentity()
	if err != nil {
		return err
	}
	a := &agent{nf: nf, id: id, idle: 5 * time.Minute, stdout: stdout, stderr: stderr, log: nf.logger(stderr), state: newAgentState(), party: &po}
	return a.serve(ctx, *httpAddr)
}

// controlPath is where peerlink up listens for status and down by default.
func controlPath(partyName string) string {
	dir := os.Getenv("PEERLINK_RUN_DIR")
	switch {
	case dir != "":
	case os.Geteuid() == 0:
		dir = "/run/peerlink"
	case os.Getenv("XDG_RUNTIME_DIR") != "":
		dir = filepath.Join(os.Getenv("XDG_RUNTIME_DIR"), "peerlink")
	default:
		dir = filepath.Join(os.TempDir(), fmt.Sprintf("peerlink-%d", os.Getuid()))
	}
	return filepath.Join(dir, partyName+".sock")
}

// serveControl answers 'peerlink status' (GET /status) and 'peerlink down' (POST
// /down, which calls down) on a unix socket only this user can open.
func serveControl(path string, dev *partynet.Device, down func()) (io.Closer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use: is 'peerlink up' already running for this party? ('peerlink down' stops it; --control picks another socket)", path)
	}
	os.Remove(path) // left by a process that did not stop cleanly
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	os.Chmod(path, 0o600)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(dev.Status())
	})
	mux.HandleFunc("POST /down", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "going down")
		// The answer leaves before the agent stops, or the caller would see EOF.
		w.(http.Flusher).Flush()
		down()
	})
	h := &agentHTTP{hs: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, done: make(chan struct{})}
	h.wg.Go(func() { h.hs.Serve(ln) })
	return h, nil
}

// controlClient talks to a running peerlink up over its control socket.
func controlClient(path string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
}

// controlTarget resolves the control socket for status and down: --control, or the
// default one of --party, or the only socket in the default directory.
func controlTarget(control, partyName string) (string, error) {
	if control != "" {
		return control, nil
	}
	if partyName != "" {
		return controlPath(partyName), nil
	}
	socks, _ := filepath.Glob(filepath.Join(filepath.Dir(controlPath("x")), "*.sock"))
	switch len(socks) {
	case 0:
		return "", errors.New("no party is up ('peerlink up --party NAME' brings one up)")
	case 1:
		return socks[0], nil
	}
	return "", fmt.Errorf("%w: several parties are up; pick one with --party NAME", errUsage)
}

func controlFlags(name string, stderr io.Writer, usage string) (*flag.FlagSet, *string, *string, *bool) {
	fs := flag.NewFlagSet("peerlink "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	p := fs.String("party", "", "the party (default: the only one up)")
	c := fs.String("control", "", "the control socket 'peerlink up' was given")
	j := fs.Bool("json", false, "print JSON")
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	return fs, p, c, j
}

// runStatus prints a running party's members: virtual IPs, method and latency.
func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, partyName, control, asJSON := controlFlags("status", stderr, `Usage: peerlink status [--party NAME] [--control PATH] [--json]

Shows the party that 'peerlink up' runs: each member's virtual IPv4 and IPv6 address,
whether it is connected and how (direct, punched, relayed), its latency and WireGuard's
traffic with it.

Flags:
`)
	resp, _, err := controlRequest(ctx, fs, args, control, partyName, http.MethodGet, "status")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var st partynet.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return fmt.Errorf("reading status: %w", err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(st)
	}
	fmt.Fprintf(stdout, "party %s on %s (%s, %s), owner %s; broadcasts sent %d, received %d\n",
		st.Party, st.Interface, st.Prefix4, st.Prefix6, st.Owner.Short(), st.BroadcastsSent, st.BroadcastsReceived)
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tIPV4\tIPV6\tMETHOD\tLATENCY\tRX\tTX")
	for _, m := range st.Members {
		method, lat := "-", "-"
		switch {
		case m.Self:
			method = "this node"
		case m.Connected:
			method = m.Method
			if m.LatencyMS > 0 {
				lat = fmt.Sprintf("%.1f ms", m.LatencyMS)
			}
		case m.Online:
			method = "connecting"
		default:
			method = "offline"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\n", m.NodeID.Short(), m.IPv4, m.IPv6, method, lat, m.RxBytes, m.TxBytes)
	}
	return tw.Flush()
}

// runDown stops a running peerlink up: its interface goes, its connections say bye.
func runDown(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, partyName, control, _ := controlFlags("down", stderr, `Usage: peerlink down [--party NAME] [--control PATH]

Stops 'peerlink up': the party interface is removed and the connections to the other
members end. Membership stays ('peerlink party leave' ends it).

Flags:
`)
	resp, path, err := controlRequest(ctx, fs, args, control, partyName, http.MethodPost, "down")
	if err != nil {
		return err
	}
	resp.Body.Close()
	// Wait for the socket to go: down returns once the interface is gone.
	for range 100 {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Fprintln(stdout, "down")
	return nil
}

// controlRequest parses status's or down's flags and sends the request to the
// control socket they name; it returns the response and the socket's path.
func controlRequest(ctx context.Context, fs *flag.FlagSet, args []string, control, partyName *string, method, what string) (*http.Response, string, error) {
	if err := parseOnly(fs, args); err != nil {
		return nil, "", err
	}
	path, err := controlTarget(*control, *partyName)
	if err != nil {
		return nil, "", err
	}
	req, _ := http.NewRequestWithContext(ctx, method, "http://peerlink/"+what, nil)
	resp, err := controlClient(path).Do(req)
	if err != nil {
		return nil, "", fmt.Errorf("no 'peerlink up' answers on %s: %w", path, err)
	}
	return resp, path, nil
}

func parseOnly(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	return nil
}

// upParty joins the party when given an invite, brings its device up and serves the
// control socket; down stops the agent.
func (a *agent) upParty(ctx context.Context, sig *signal.Client, node *connect.Node, dir *sigDirectory, down func()) (*partynet.Device, io.Closer, error) {
	po := a.party
	if po.invite != "" {
		jctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		_, err := sig.JoinParty(jctx, po.invite)
		cancel()
		if err != nil {
			return nil, nil, fmt.Errorf("joining party %s: %w", po.name, err)
		}
	}
	dev, err := partynet.Up(ctx, partynet.Config{
		Party: po.name, Node: node, Directory: dir, Interface: po.iface, MTU: po.mtu,
		Forward: po.fwd, Logger: a.log,
	})
	if err != nil {
		return nil, nil, err
	}
	ctl, err := serveControl(po.control, dev, down)
	if err != nil {
		dev.Close()
		return nil, nil, err
	}
	st := dev.Status()
	self := st.Members[0]
	a.emit(agentEvent{Event: "party", Party: st.Party, Interface: st.Interface, IPv4: self.IPv4.String(), IPv6: self.IPv6.String()},
		fmt.Sprintf("party %s: interface %s up with %s and %s (%d other members; 'peerlink status' shows them)",
			st.Party, st.Interface, self.IPv4, self.IPv6, len(st.Members)-1))
	return dev, ctl, nil
}
