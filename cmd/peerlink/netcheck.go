package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"peerlink/detect"
	"peerlink/nat"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// netcheckJSON is the --json output: the profile's fields flat, plus the observers.
type netcheckJSON struct {
	NATType          string               `json:"nat_type"`
	Mapping          nat.Mapping          `json:"mapping"`
	Filtering        nat.Filtering        `json:"filtering"`
	Allocation       nat.Allocation       `json:"allocation"`
	PublicIP         string               `json:"public_ip"`
	PublicPort       uint16               `json:"public_port"`
	PortDelta        int                  `json:"port_delta"`
	Hairpinning      bool                 `json:"hairpinning"`
	BindingLifetimeS float64              `json:"binding_lifetime_s,omitempty"`
	Open             bool                 `json:"open"`
	UDPBlocked       bool                 `json:"udp_blocked"`
	Confidence       nat.Confidence       `json:"confidence"`
	DetectedAt       time.Time            `json:"detected_at"`
	DurationMS       float64              `json:"duration_ms"`
	Servers          []netcheckServerJSON `json:"servers"`
	Notes            []string             `json:"notes,omitempty"`
}

type netcheckServerJSON struct {
	Addr    string  `json:"addr"`
	RTTMS   float64 `json:"rtt_ms,omitempty"`
	Mapped  string  `json:"mapped,omitempty"`
	RFC5780 bool    `json:"rfc5780"`
	Error   string  `json:"error,omitempty"`
}

func runNetcheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("netcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var servers stringList
	fs.Var(&servers, "stun", "STUN observer host:port (repeatable; put an RFC 5780 server first)")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	timeout := fs.Duration("timeout", detect.DefaultTimeout, "give up after this long")
	lifetime := fs.Bool("binding-lifetime", false, "also measure how long idle mappings last (takes up to about 11 minutes; needs RESPONSE-PORT on the first observer)")
	local := fs.Bool("local", false, "start a local RFC 5780 STUN server on 127.0.0.1 and 127.0.0.2 and check against it")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink netcheck [--stun HOST:PORT ...] [--json] [--timeout D] [--local]

Profiles the NAT in front of this host: mapping, filtering and port allocation
(NATCracker model), public address, hairpinning, and each observer's latency.

Examples:
  peerlink netcheck --stun stun.example.net:3478 --stun 198.51.100.2:3478
  peerlink netcheck --local --json

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
	if *local {
		addrs, stop, err := startLocalSTUN(ctx)
		if err != nil {
			return fmt.Errorf("starting local STUN server: %w", err)
		}
		defer stop()
		servers = append(addrs, servers...)
	}
	if len(servers) == 0 {
		return fmt.Errorf("%w: no STUN observers: pass --stun HOST:PORT (run 'peerlink stun' for one) or --local", errUsage)
	}
	d := detect.New(detect.Config{Observers: servers})
	defer d.Close()
	rep, err := d.DetectReport(ctx, detect.Options{Timeout: *timeout})
	if err != nil && !rep.Profile.UDPBlocked {
		return err
	}
	if *lifetime && err == nil {
		fmt.Fprintln(stderr, "measuring binding lifetime (idle gaps of 10s to 320s)...")
		l, lerr := d.MeasureBindingLifetime(ctx, detect.LifetimeOptions{})
		if lerr != nil {
			return lerr
		}
		rep.Profile.BindingLifetime = nat.Duration(l)
	}
	if *jsonOut {
		p := rep.Profile
		out := netcheckJSON{
			NATType: p.Classic().String(), Mapping: p.Mapping, Filtering: p.Filtering, Allocation: p.Allocation,
			PublicPort: p.PublicPort, PortDelta: p.PortDelta, Hairpinning: p.Hairpinning, Open: p.Open,
			UDPBlocked: p.UDPBlocked, Confidence: p.Confidence, DetectedAt: p.DetectedAt,
			BindingLifetimeS: time.Duration(p.BindingLifetime).Seconds(),
			DurationMS:       float64(rep.Duration.Microseconds()) / 1000, Notes: rep.Notes,
		}
		if p.PublicIP.IsValid() {
			out.PublicIP = p.PublicIP.String()
		}
		for _, s := range rep.Servers {
			js := netcheckServerJSON{Addr: s.Addr.String(), RFC5780: s.RFC5780, Error: s.Err}
			if s.Mapped.IsValid() {
				js.Mapped = s.Mapped.String()
				js.RTTMS = float64(s.RTT.Microseconds()) / 1000
			}
			out.Servers = append(out.Servers, js)
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
		return err
	}
	printReport(stdout, rep)
	return err
}

var policyWords = map[string]string{
	"ei": "endpoint-independent", "hd": "host-dependent", "pd": "port-dependent",
	"pp": "port preservation", "pc": "port contiguity", "rd": "random", "unknown": "unknown",
}

func printReport(w io.Writer, rep detect.Report) {
	p := rep.Profile
	fmt.Fprintf(w, "NAT: %s (detected in %v, confidence %s)\n", p.Classic().Describe(), rep.Duration.Round(time.Millisecond), p.Confidence)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "  mapping:\t%s (%s)\n", p.Mapping, policyWords[p.Mapping.String()])
	fmt.Fprintf(tw, "  filtering:\t%s (%s)\n", p.Filtering, policyWords[p.Filtering.String()])
	alloc := fmt.Sprintf("%s (%s)", p.Allocation, policyWords[p.Allocation.String()])
	if p.Allocation == nat.AllocationPC {
		alloc += fmt.Sprintf(", delta %+d", p.PortDelta)
	}
	fmt.Fprintf(tw, "  allocation:\t%s\n", alloc)
	if p.PublicIP.IsValid() {
		fmt.Fprintf(tw, "  public address:\t%s\n", p.Public())
	}
	fmt.Fprintf(tw, "  hairpinning:\t%s\n", yesNo(p.Hairpinning))
	if p.BindingLifetime > 0 {
		fmt.Fprintf(tw, "  binding lifetime:\t%v\n", time.Duration(p.BindingLifetime))
	}
	tw.Flush()
	fmt.Fprintln(w, "Observers:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, s := range rep.Servers {
		if s.Err != "" {
			fmt.Fprintf(tw, "  %s\t-\t%s\n", s.Addr, s.Err)
			continue
		}
		kind := "stun"
		if s.RFC5780 {
			kind = "stun+rfc5780"
		}
		fmt.Fprintf(tw, "  %s\t%.1f ms\t%s\tsaw %s\n", s.Addr, float64(s.RTT.Microseconds())/1000, kind, s.Mapped)
	}
	tw.Flush()
	for _, n := range rep.Notes {
		fmt.Fprintln(w, "note:", n)
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
