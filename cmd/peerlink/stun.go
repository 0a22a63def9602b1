package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"peerlink/stun"
)

func runSTUN(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink stun", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		listen     = fs.String("listen", ":3478", "primary UDP (and TCP) address, host:port")
		altIP      = fs.String("alt-ip", "", "second IP of the same family: turns on RFC 5780 (OTHER-ADDRESS, CHANGE-REQUEST); --listen must then name a specific IP")
		altPort    = fs.Uint("alt-port", 0, "alternate port for RFC 5780 (default: the --listen port plus one)")
		tcp        = fs.Bool("tcp", true, "also answer Binding requests over TCP on the primary address")
		software   = fs.String("software", "peerlink", "SOFTWARE attribute of every answer (empty: none)")
		rate       = fs.Float64("rate", stun.DefaultRate, "requests per second each source IP (IPv6: /64) may sustain")
		burst      = fs.Float64("burst", stun.DefaultBurst, "requests a source may send at once")
		changeCost = fs.Float64("change-cost", stun.DefaultChangeCost, "tokens an honoured CHANGE-REQUEST costs (other answers cost 1)")
		maxSources = fs.Int("max-sources", stun.DefaultMaxSources, "sources the rate limiter tracks at once (32 bytes each)")
		noLimit    = fs.Bool("no-rate-limit", false, "turn the rate limiter off")
		sockets    = fs.Int("sockets", 0, "SO_REUSEPORT sockets per address on Linux (default: one per CPU)")
		statsEvery = fs.Duration("stats", 0, "print counters this often (0: only at exit)")
		verbose    = fs.Bool("v", false, "debug logging")
	)
	fs.Usage = func() {
		fmt.Fprintf(stderr, `Usage: peerlink stun [flags]

Runs peerlink's STUN server alone: RFC 8489 Binding over UDP and TCP, RFC 5780 NAT
behaviour discovery with --alt-ip, answers for RFC 3489 clients.

Examples:
  peerlink stun --listen :3478
  peerlink stun --listen 192.0.2.1:3478 --alt-ip 192.0.2.2
  peerlink stun --listen 127.0.0.1:3478 --alt-ip 127.0.0.2 --alt-port 3479

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
	cfg := stun.Config{
		Listen:         *listen,
		TCP:            *tcp,
		Software:       *software,
		SocketsPerAddr: *sockets,
		RateLimit: stun.RateLimit{
			Disabled:   *noLimit,
			Rate:       *rate,
			Burst:      *burst,
			ChangeCost: *changeCost,
			MaxSources: *maxSources,
		},
	}
	if *rate <= 0 || *burst <= 0 || *changeCost <= 0 || *maxSources <= 0 {
		return fmt.Errorf("%w: --rate, --burst, --change-cost and --max-sources must be positive (use --no-rate-limit)", errUsage)
	}
	if *altIP != "" {
		ip, err := netip.ParseAddr(*altIP)
		if err != nil {
			return fmt.Errorf("%w: --alt-ip: %v", errUsage, err)
		}
		cfg.AltIP = ip
	}
	if *altPort > 65535 {
		return fmt.Errorf("%w: --alt-port %d out of range", errUsage, *altPort)
	}
	cfg.AltPort = uint16(*altPort)
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	srv, err := stun.Listen(ctx, cfg)
	if err != nil {
		if errors.Is(err, stun.ErrConfig) {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		return err
	}
	defer srv.Close()
	fmt.Fprintf(stdout, "peerlink stun: udp %v", srv.UDPAddr(0))
	if srv.RFC5780() {
		fmt.Fprintf(stdout, ", rfc5780 %v %v %v", srv.UDPAddr(stun.ChangePort), srv.UDPAddr(stun.ChangeIP), srv.UDPAddr(stun.ChangeIP|stun.ChangePort))
	}
	if a := srv.TCPAddr(); a.IsValid() {
		fmt.Fprintf(stdout, ", tcp %v", a)
	}
	fmt.Fprintln(stdout)

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	if *statsEvery > 0 {
		wg.Go(func() {
			t := time.NewTicker(*statsEvery)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					printSTUNStats(stderr, srv.Stats())
				}
			}
		})
	}
	err = srv.Serve(ctx)
	printSTUNStats(stdout, srv.Stats())
	return err
}

func printSTUNStats(w io.Writer, s stun.Stats) {
	fmt.Fprintf(w, "stun stats: received=%d requests=%d responses=%d changed=%d err400=%d err420=%d drop: not-stun=%d ignored=%d rate-limited=%d forbidden=%d send-failed=%d tcp-limit=%d\n",
		s.Received, s.Requests, s.Responses, s.ChangedResponses, s.BadRequest, s.UnknownAttribute,
		s.Dropped.NotSTUN, s.Dropped.Ignored, s.Dropped.RateLimited, s.Dropped.Forbidden, s.Dropped.SendFailed, s.Dropped.TCPConnLimit)
}
