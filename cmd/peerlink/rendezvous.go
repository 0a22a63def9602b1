package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"peerlink/signal"
	"peerlink/store"
	"peerlink/store/natsstore"
)

func runRendezvous(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink rendezvous", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		listen     = fs.String("listen", "", "address to listen on (default :8443 with --cert, else :8080)")
		cert       = fs.String("cert", "", "TLS certificate file: serve wss:// (needs --key)")
		key        = fs.String("key", "", "TLS key file")
		natsURL    = fs.String("nats", "", "NATS server URLs, comma separated: share state and routing with other rendezvous servers (default: in-memory, this process only)")
		replicas   = fs.Int("nats-replicas", 1, "JetStream replicas of the key-value buckets (3 on a three-node cluster)")
		turnSecret = fs.String("turn-secret", "", "TURN REST shared secret, as in coturn's static-auth-secret (default $PEERLINK_TURN_SECRET; none: no TURN credentials)")
		turnTTL    = fs.Duration("turn-ttl", time.Hour, "lifetime of issued TURN credentials")
		turnURIs   stringList // netcheck.go's repeatable flag
		maxClients = fs.Int("max-clients", 0, "most authenticated clients at once (0: no limit)")
		rate       = fs.Float64("rate", 20, "frames per second each connection may sustain")
		burst      = fs.Int("burst", 100, "frames a connection may send at once")
		maxFrame   = fs.Int("max-frame", 16<<10, "largest frame accepted, bytes")
		skipVerify = fs.Bool("skip-signature-check", false, "do not verify routed messages' signatures on the server (receivers still do); saves about 50 µs of CPU per message")
		statsEvery = fs.Duration("stats", 0, "print counters this often (0: only at exit)")
		verbose    = fs.Bool("v", false, "debug logging")
	)
	fs.Var(&turnURIs, "turn-uri", "TURN server URI handed out with credentials, e.g. turn:relay.example:3478 (repeatable)")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink rendezvous [--listen ADDR] [--cert F --key F] [--nats URL] [--turn-secret S]

Runs the rendezvous (signaling) server alone. Nodes connect over WebSocket, authenticate
with their identity, publish their NAT profile and candidates, look each other up, and
exchange signed offer, answer, candidate, punch and bye messages. The protocol is in
docs/protocol.md.

Examples:
  peerlink rendezvous --listen :8080
  peerlink rendezvous --listen :443 --cert cert.pem --key key.pem --turn-secret S --turn-uri turn:relay.example:3478
  peerlink rendezvous --nats nats://n1:4222,nats://n2:4222,nats://n3:4222 --nats-replicas 3

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
	if (*cert == "") != (*key == "") {
		return fmt.Errorf("%w: --cert and --key go together", errUsage)
	}
	if *rate <= 0 || *burst <= 0 || *maxFrame <= 0 || *turnTTL <= 0 || *replicas <= 0 || *maxClients < 0 {
		return fmt.Errorf("%w: --rate, --burst, --max-frame, --turn-ttl and --nats-replicas must be positive", errUsage)
	}
	if *turnSecret == "" {
		*turnSecret = os.Getenv("PEERLINK_TURN_SECRET")
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	var st store.Store
	storeName := "memory"
	if *natsURL != "" {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		ns, err := natsstore.New(sctx, natsstore.Config{URL: *natsURL, Replicas: *replicas, Logger: log})
		cancel()
		if err != nil {
			return err
		}
		defer ns.Close()
		st, storeName = ns, "nats "+*natsURL
	}
	srv, err := signal.NewServer(signal.Config{
		CertFile: *cert, KeyFile: *key,
		Store:      st,
		TURNSecret: *turnSecret, TURNTTL: *turnTTL, TURNURIs: turnURIs,
		MaxFrame: *maxFrame, RateLimit: *rate, RateBurst: *burst, MaxClients: *maxClients,
		SkipSignatureCheck: *skipVerify,
		Logger:             log,
	})
	if err != nil {
		return err
	}
	defer srv.Close()
	addr, scheme := *listen, "ws"
	if *cert != "" {
		scheme = "wss"
	}
	if addr == "" {
		addr = map[string]string{"ws": ":8080", "wss": ":8443"}[scheme]
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	turn := "off"
	if *turnSecret != "" {
		turn = "on"
	}
	fmt.Fprintf(stdout, "peerlink rendezvous: %s://%s/ (store %s, TURN credentials %s)\n", scheme, ln.Addr(), storeName, turn)

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
					printRendezvousStats(stderr, srv.Stats())
				}
			}
		})
	}
	err = srv.Serve(ctx, ln)
	printRendezvousStats(stdout, srv.Stats())
	return err
}

func printRendezvousStats(w io.Writer, s signal.Stats) {
	fmt.Fprintf(w, "rendezvous stats: connections=%d authenticated=%d routed=%d errors=%d abusive=%d\n",
		s.Connections, s.Authenticated, s.Routed, s.Errors, s.Abusive)
}
