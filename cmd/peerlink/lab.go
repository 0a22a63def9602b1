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
	"sync"
	"text/tabwriter"
	"time"

	"peerlink/netlab"
)

const labUsage = `Usage: peerlink lab <up|down|selftest> [flags]   (needs root)

  up        build the kernel NAT lab, print its topology, keep it until Ctrl-C
  down      remove namespaces left behind by lab runs that are gone
  selftest  build the lab, probe every NAT, compare with what each kind claims

NAT kinds: %s

Examples:
  peerlink lab selftest
  peerlink lab selftest --kinds full-cone,symmetric --json
  peerlink lab up --kinds port-restricted,cgnat --loss 5
  peerlink lab down --all
`

func runLab(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	kinds := make([]string, 0, len(netlab.AllKinds()))
	for _, k := range netlab.AllKinds() {
		kinds = append(kinds, k.String())
	}
	usage := fmt.Sprintf(labUsage, strings.Join(kinds, ", "))
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("%w: lab needs a subcommand: up, down or selftest", errUsage)
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	case "up":
		return runLabUp(ctx, args[1:], stdout, stderr)
	case "down":
		return runLabDown(ctx, args[1:], stdout, stderr)
	case "selftest":
		return runLabSelfTest(ctx, args[1:], stdout, stderr)
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("%w: unknown lab subcommand %q", errUsage, args[0])
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	return nil
}

func parseKinds(s string) ([]netlab.Kind, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []netlab.Kind
	for _, f := range strings.Split(s, ",") {
		k, err := netlab.ParseKind(f)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		out = append(out, k)
	}
	return out, nil
}

func runLabUp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("lab up", flag.ContinueOnError)
	fs.SetOutput(stderr)
	kindsFlag := fs.String("kinds", "", "comma-separated NAT kinds (default: all)")
	hosts := fs.Int("hosts", 1, "hosts behind each NAT")
	loss := fs.Int("loss", 0, "percent of packets each site's internet link drops, each way")
	delay := fs.Duration("delay", 0, "delay each site's internet link adds, each way (userspace relay)")
	verify := fs.Bool("verify", true, "probe every NAT before announcing the lab, and give up if one misbehaves")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	kinds, err := parseKinds(*kindsFlag)
	if err != nil {
		return err
	}
	if len(kinds) == 0 {
		kinds = netlab.AllKinds()
	}
	var sites []netlab.SiteConfig
	for _, k := range kinds {
		sc := netlab.SiteConfig{Kind: k, Hosts: *hosts, Link: netlab.Link{Loss: *loss, Delay: *delay}}
		if k == netlab.KindNone {
			sc.Hosts = 1
		}
		sites = append(sites, sc)
	}
	lab, err := netlab.New(ctx, netlab.Config{Sites: sites, Logger: progressLogger(stderr)})
	if err != nil {
		return err
	}
	if *verify {
		// Lost probes look like stricter filtering: retry more on lossy links, wait longer
		// on slow ones.
		opts := netlab.SelfTestOptions{Timeout: 300*time.Millisecond + 2**delay, Attempts: 3}
		if *loss > 0 {
			opts.Attempts = 10
		}
		fmt.Fprintf(stderr, "peerlink lab: verifying %d sites with probes\n", len(lab.Sites))
		checks, err := netlab.SelfTest(ctx, lab, opts)
		if err == nil {
			err = reportChecks(stdout, stderr, checks, false, lab.ID)
		}
		if err != nil {
			return errors.Join(err, lab.Close())
		}
	}
	lab.Describe(stdout)
	fmt.Fprintf(stdout, "lab %s is up; press Ctrl-C to tear it down\n", lab.ID)
	<-ctx.Done()
	fmt.Fprintln(stderr, "peerlink lab: tearing down")
	return lab.Close()
}

func runLabDown(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("lab down", flag.ContinueOnError)
	fs.SetOutput(stderr)
	all := fs.Bool("all", false, "also remove labs whose process is still running")
	runID := fs.String("run", "", "remove only this run ID, running or not")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	res, err := netlab.Down(ctx, netlab.DownOptions{All: *all, RunID: *runID})
	for _, r := range res.Removed {
		fmt.Fprintln(stdout, "removed", r)
	}
	for _, id := range res.Running {
		fmt.Fprintf(stdout, "left lab %s alone: its process is still running (--all or --run %s removes it)\n", id, id)
	}
	if err != nil {
		return err
	}
	if len(res.Removed) == 0 {
		fmt.Fprintln(stdout, "nothing to remove")
	}
	return nil
}

func runLabSelfTest(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("lab selftest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	kindsFlag := fs.String("kinds", "", "comma-separated NAT kinds to test (default: all)")
	asJSON := fs.Bool("json", false, "print the results as JSON")
	timeout := fs.Duration("timeout", 300*time.Millisecond, "how long each probe waits for an answer")
	attempts := fs.Int("attempts", 3, "how often each probe is sent before it counts as filtered")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	kinds, err := parseKinds(*kindsFlag)
	if err != nil {
		return err
	}
	lab, err := netlab.New(ctx, netlab.Config{Sites: netlab.SelfTestSites(kinds...), Logger: progressLogger(stderr)})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := lab.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	fmt.Fprintf(stderr, "peerlink lab: probing %d sites\n", len(lab.Sites))
	checks, err := netlab.SelfTest(ctx, lab, netlab.SelfTestOptions{Timeout: *timeout, Attempts: *attempts})
	if err != nil {
		return err
	}
	return reportChecks(stdout, stderr, checks, *asJSON, lab.ID)
}

// reportChecks prints the checks as a table or JSON, then every problem loudly, and
// fails when any NAT does not behave as claimed.
func reportChecks(stdout, stderr io.Writer, checks []netlab.Check, asJSON bool, run string) error {
	failed := 0
	for _, c := range checks {
		if !c.OK() {
			failed++
		}
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false)
		if err := enc.Encode(struct {
			Run    string         `json:"run"`
			OK     bool           `json:"ok"`
			Checks []netlab.Check `json:"checks"`
		}{run, failed == 0, checks}); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ROUTER\tHOST\tCLAIMED\tMEASURED\tTCP\tOK")
		for _, c := range checks {
			ok := "ok"
			if !c.OK() {
				ok = "FAIL"
			}
			router, _, _ := strings.Cut(c.Router, " (")
			tcp := c.TCP
			if tcp == "" {
				tcp = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", router, c.Host, netlab.ClaimString(c.Claimed), netlab.ClaimString(c.Measured), tcp, ok)
		}
		tw.Flush()
	}
	for _, c := range checks {
		for _, p := range c.Problems {
			fmt.Fprintf(stderr, "FAIL site %s: router %s, probed from %s: %s\n", c.Site, c.Router, c.Host, p)
		}
	}
	if failed > 0 {
		return fmt.Errorf("self-test FAILED: %d of %d NATs do not behave as claimed (see FAIL lines above)", failed, len(checks))
	}
	fmt.Fprintf(stderr, "peerlink lab: all %d NATs behave as claimed\n", len(checks))
	return nil
}

// progressHandler prints log records as "peerlink lab: message (k=v ...)".
type progressHandler struct {
	mu    *sync.Mutex
	w     io.Writer
	attrs []slog.Attr
}

func progressLogger(w io.Writer) *slog.Logger {
	return slog.New(&progressHandler{mu: new(sync.Mutex), w: w})
}

func (h *progressHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }

func (h *progressHandler) Handle(_ context.Context, r slog.Record) error {
	var parts []string
	add := func(a slog.Attr) bool {
		parts = append(parts, fmt.Sprintf("%s=%v", a.Key, a.Value))
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	line := "peerlink lab: " + r.Message
	if len(parts) > 0 {
		line += " (" + strings.Join(parts, " ") + ")"
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := fmt.Fprintln(h.w, line)
	return err
}

func (h *progressHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &progressHandler{mu: h.mu, w: h.w, attrs: append(append([]slog.Attr(nil), h.attrs...), as...)}
}

func (h *progressHandler) WithGroup(string) slog.Handler { return h }
