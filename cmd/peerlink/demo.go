package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"peerlink/internal/demo"
	"peerlink/netlab"
)

// errDemoFailed: the demo ran, but a peer or a pair did not do what the plan says.
var errDemoFailed = errors.New("not every pair connected as predicted")

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		kinds      = fs.String("kinds", "", "comma-separated NAT kinds of the peers, one peer each (default: "+kindList(demo.DefaultKinds())+")")
		seed       = fs.Uint64("seed", 1, "seed of the emulator's random choices (ports, loss)")
		latency    = fs.Duration("latency", 10*time.Millisecond, "one-way latency of each peer's uplink (0: none, everything at memory speed)")
		timeout    = fs.Duration("timeout", 10*time.Second, "give up on a connection that has no path within this long")
		directWait = fs.Duration("direct-wait", 10*time.Second, "how long a relayed connection may take to move to the direct path its plan promises")
		parallel   = fs.Int("parallel", 0, "pairs connecting at once; each peer is in one pair at a time (0: as many as possible)")
		jsonOut    = fs.Bool("json", false, "print the report as JSON on stdout")
		quiet      = fs.Bool("q", false, "no progress on stderr")
		verbose    = fs.Bool("v", false, "debug logging of every component on stderr")
	)
	fs.Usage = func() {
		fmt.Fprintf(stderr, `Usage: peerlink demo [--kinds K,K,...] [--seed N] [--latency D] [--json]

Shows peerlink end to end in one command, with no root and no internet: it builds an
emulated internet in this process (peerlink's userspace NAT emulator) with an RFC 5780
STUN server on two IPs, a TURN relay and a rendezvous server, and puts one peer behind
each NAT kind. Every peer profiles its NAT for real, with STUN, and the demo prints
what it found next to what the NAT was built as. Then every peer connects to every
other (both directions) and the demo prints a matrix of how each pair connected —
direct (dialled), punched (hole punching) or relayed — with the time to the first path
and to the direct path, and checks the method against the plan peerlink makes for the
two profiles (nat.Strategy).

NAT kinds: %s.

Exit status: 0 every profile as built and every pair connected by the predicted
method, 1 otherwise (the report says which), 2 bad usage.

Examples:
  peerlink demo
  peerlink demo --json | jq '.pairs[] | select(.method == "punched")'
  peerlink demo --kinds symmetric,symmetric,port-restricted --latency 20ms

Flags:
`, kindList(demo.DefaultKinds()))
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
	cfg := demo.Config{Seed: *seed, Latency: *latency, Timeout: *timeout, DirectWait: *directWait, Parallel: *parallel}
	if *timeout <= 0 || *directWait <= 0 || *latency < 0 || *parallel < 0 {
		return fmt.Errorf("%w: --timeout and --direct-wait must be positive, --latency and --parallel not negative", errUsage)
	}
	if *kinds != "" {
		for s := range strings.SplitSeq(*kinds, ",") {
			k, err := netlab.ParseKind(s)
			if err != nil {
				return fmt.Errorf("%w: --kinds: %v", errUsage, err)
			}
			if k == netlab.KindUDPBlocked {
				return fmt.Errorf("%w: --kinds: udp-blocked peers need TURN over TCP, which the emulator has not (the kernel lab has: peerlink lab)", errUsage)
			}
			cfg.Kinds = append(cfg.Kinds, k)
		}
		if len(cfg.Kinds) < 2 {
			return fmt.Errorf("%w: --kinds: a demo needs at least two peers", errUsage)
		}
	}
	if !*quiet {
		cfg.Progress = func(s string) { fmt.Fprintln(stderr, s) }
	}
	if *verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	rep, err := demo.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if *jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printDemo(stdout, rep, *seed)
	}
	if !rep.OK {
		return fmt.Errorf("%w: %d of %d peers and pairs failed (see the report)", errDemoFailed, rep.Failures(), len(rep.Peers)+len(rep.Pairs))
	}
	return nil
}

func kindList(ks []netlab.Kind) string {
	s := make([]string, len(ks))
	for i, k := range ks {
		s[i] = k.String()
	}
	return strings.Join(s, ",")
}

// printDemo prints the report for people: the peers, the matrix and each pair.
func printDemo(w io.Writer, rep *demo.Report, seed uint64) {
	verdict := "every pair connected as predicted"
	if !rep.OK {
		verdict = fmt.Sprintf("%d FAILED", rep.Failures())
	}
	fmt.Fprintf(w, "peerlink demo: %d peers, %d connections in %v (seed %d): %s\n\n",
		len(rep.Peers), len(rep.Pairs), time.Duration(rep.Elapsed).Round(time.Millisecond), seed, verdict)

	fmt.Fprintln(w, "Peers (NAT profiled with STUN, RFC 5780; mapping-filtering-allocation):")
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "  #\tpeer\tbuilt as\tdetected\t\tclassic\tstart")
	for i, p := range rep.Peers {
		mark, classic := "ok", p.Profile.Classic().Describe()
		switch {
		case p.Error != "":
			mark, classic = "FAILED", p.Error
		case !p.Matches:
			mark = "MISMATCH"
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\t%v\n", i+1, p.Name, p.Expected, p.Detected, mark, classic, time.Duration(p.StartTime).Round(time.Millisecond))
	}
	tw.Flush()

	idx := map[string]int{}
	for i, p := range rep.Peers {
		idx[p.Name] = i
	}
	cells := make([][]string, len(rep.Peers))
	for i := range cells {
		cells[i] = make([]string, len(rep.Peers))
		cells[i][i] = "·"
	}
	for _, p := range rep.Pairs {
		i, ok1 := idx[p.Initiator]
		j, ok2 := idx[p.Responder]
		if !ok1 || !ok2 {
			continue
		}
		cells[i][j] = matrixCell(p)
	}
	fmt.Fprintln(w, "\nWho connected to whom (row connects to column): method and time to the direct path,")
	fmt.Fprintln(w, "or to the relayed path when the plan has no direct one:")
	tw = tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprint(tw, "  \t")
	for i := range rep.Peers {
		fmt.Fprintf(tw, "%d\t", i+1)
	}
	fmt.Fprintln(tw)
	for i, p := range rep.Peers {
		fmt.Fprintf(tw, "  %d %s\t", i+1, p.Name)
		for j := range rep.Peers {
			fmt.Fprintf(tw, "%s\t", cells[i][j])
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	fmt.Fprintln(w, "  D direct (dialled a reachable peer), P punched (hole punching), R relayed (TURN);")
	fmt.Fprintln(w, "  ! method differs from the prediction, x failed.")

	fmt.Fprintln(w, "\nEach connection (first path is usually the relay; the direct path replaces it):")
	tw = tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "  initiator\tresponder\tplan\tpredicted\tmethod\tfirst path\tdirect path\t")
	for _, p := range rep.Pairs {
		method := p.Method
		switch {
		case !p.Connected:
			method = "FAILED: " + p.Error
		case !p.OK:
			method += " (MISMATCH)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", p.Initiator, p.Responder, p.Plan, p.Predicted, method, durText(p.FirstPath), durText(p.ToDirect))
	}
	tw.Flush()
}

func matrixCell(p demo.Pair) string {
	if !p.Connected {
		return "x"
	}
	c := strings.ToUpper(p.Method[:1])
	if !p.OK {
		c += "!"
	}
	d := p.ToDirect
	if d == nil {
		d = p.FirstPath
	}
	return c + " " + durText(d)
}

func durText(d *demo.Duration) string {
	if d == nil {
		return "-"
	}
	v := time.Duration(*d)
	if v < 10*time.Millisecond {
		return v.Round(100 * time.Microsecond).String()
	}
	return v.Round(time.Millisecond).String()
}
