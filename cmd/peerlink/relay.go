package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"peerlink/relay"
	"peerlink/relayreg"
)

// relayFlagList collects a repeatable flag.
type relayFlagList []string

func (l *relayFlagList) String() string     { return strings.Join(*l, ",") }
func (l *relayFlagList) Set(v string) error { *l = append(*l, v); return nil }

func runRelay(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var users, relayIPs, denied relayFlagList
	listen := fs.String("listen", ":3478", "UDP and TCP listen address (host:port; an empty host means every address)")
	noUDP := fs.Bool("no-udp", false, "do not serve UDP on --listen")
	noTCP := fs.Bool("no-tcp", false, "do not serve TCP on --listen")
	tlsListen := fs.String("tls-listen", "", "TLS listen address, e.g. :443 (needs --cert and --key)")
	cert := fs.String("cert", "", "TLS certificate chain (PEM)")
	key := fs.String("key", "", "TLS private key (PEM)")
	fs.StringVar(key, "pkey", "", "same as --key")
	fs.Var(&users, "user", "long-term credential USER:PASS (repeatable)")
	realm := fs.String("realm", "peerlink", "authentication realm")
	secret := fs.String("secret", "", "shared secret for TURN REST ephemeral credentials (user name EXPIRY:ID)")
	fs.StringVar(secret, "static-auth-secret", "", "same as --secret")
	fs.Var(&relayIPs, "relay-ip", "address relayed sockets bind to, one IPv4 and one IPv6 at most (repeatable)")
	minPort := fs.Uint("min-port", 0, "lowest relayed port (0: the kernel's ephemeral range)")
	maxPort := fs.Uint("max-port", 0, "highest relayed port")
	maxSessions := fs.Int("max-sessions", 0, "concurrent sessions before Allocate gets 486 (0: no cap)")
	userQuota := fs.Int("user-quota", 0, "concurrent sessions per user (0: no cap)")
	sourceQuota := fs.Int("source-quota", relay.DefaultPerSourceQuota, "concurrent sessions per client IP address, IPv6 /64 (0: no cap)")
	reqRate := fs.Float64("request-rate", relay.DefaultRequestRate, "TURN requests per second each client IP address (IPv6: /64) may sustain; more are dropped")
	reqBurst := fs.Float64("request-burst", relay.DefaultRequestBurst, "requests each client IP address may send at once")
	reqUnauth := fs.Float64("request-unauth-cost", relay.DefaultUnauthenticatedCost, "what a request without credentials (answered with a 401 and a nonce) costs, in requests")
	reqSources := fs.Int("request-max-sources", relay.DefaultMaxSources, "client addresses the request limiter tracks at once (32 bytes each)")
	noReqLimit := fs.Bool("no-request-limit", false, "turn the per-address request limit off (load tests from one machine)")
	bandwidth := fs.Int64("bandwidth-limit", 0, "bytes per second per session, both directions (0: no limit)")
	capacity := fs.Int64("total-capacity", 0, "bytes per second over all sessions (0: no limit)")
	sessionTimeout := fs.Duration("session-timeout", 0, "end sessions idle this long (0: only lifetimes end them)")
	allowLoopback := fs.Bool("allow-loopback-peers", false, "let clients relay to loopback addresses (labs)")
	allowPrivate := fs.Bool("allow-private-peers", false, "let clients relay to private and link-local addresses (labs)")
	fs.Var(&denied, "denied-peer-ip", "a further prefix (CIDR) peers may never be in (repeatable)")
	rendezvous := fs.String("rendezvous", "", "rendezvous server URL (ws:// or wss://) to register with, so nodes find this relay (default $PEERLINK_SERVER)")
	identityFile := fs.String("identity", "", "the relay's identity key file, for --rendezvous (default $PEERLINK_IDENTITY, else peerlink/identity.key in the user's config directory)")
	metricsAddr := fs.String("metrics", "", "serve Prometheus metrics on this address at /metrics")
	loops := fs.Int("loops", 0, "event loops relaying UDP (0: half the CPUs)")
	verbose := fs.Bool("v", false, "log every allocation")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink relay --listen ADDR [--tls-listen ADDR --cert F --key F] [--user USER:PASS ...]
       [--realm R] [--secret S] [--relay-ip IP] [--max-sessions N] [--bandwidth-limit BYTES_PER_S]
       [--session-timeout DUR] [--source-quota N] [--request-rate R] [--no-request-limit]
       [--allow-loopback-peers] [--rendezvous URL [--identity F]] [--metrics ADDR]

Runs a TURN relay (RFC 8656) for clients on UDP, TCP and TLS. Every allocation needs
credentials: --user for fixed ones, --secret for TURN REST ephemeral ones (as coturn's
use-auth-secret). Peers on loopback, private and link-local addresses are refused unless
allowed. Each client IP address (IPv6: /64) gets --source-quota sessions at most and
--request-rate requests a second (requests over it are dropped, and logged once a source
every 5 s); the data path is bounded by --bandwidth-limit instead.
SIGUSR1 stops new sessions (existing ones carry on), SIGUSR2 allows them again.
With --rendezvous the relay registers its endpoints, capacity and load with a rendezvous
server every 10 s; nodes of that server without a --relay of their own then use it (give
the server the relay's --secret as its TURN secret so it can hand out credentials).

Examples:
  peerlink relay --listen :3478 --user alice:secret --relay-ip 203.0.113.7
  peerlink relay --listen :3478 --tls-listen :443 --cert fullchain.pem --key key.pem --secret S
  peerlink relay --listen :3478 --secret S --relay-ip 203.0.113.7 --rendezvous wss://rv.example

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
	if *sourceQuota < 0 {
		return fmt.Errorf("%w: --source-quota must not be negative (0: no cap)", errUsage)
	}
	if !*noReqLimit && (*reqRate <= 0 || *reqBurst <= 0 || *reqUnauth <= 0 || *reqSources <= 0) {
		return fmt.Errorf("%w: --request-rate, --request-burst, --request-unauth-cost and --request-max-sources must be positive (use --no-request-limit)", errUsage)
	}

	cfg := relay.Config{
		Realm:          *realm,
		Secret:         *secret,
		MaxSessions:    *maxSessions,
		PerUserQuota:   *userQuota,
		PerSourceQuota: *sourceQuota,
		RequestLimit: relay.RequestLimit{Disabled: *noReqLimit, Rate: *reqRate, Burst: *reqBurst,
			UnauthenticatedCost: *reqUnauth, MaxSources: *reqSources},
		BandwidthLimit:     *bandwidth,
		TotalCapacity:      *capacity,
		SessionTimeout:     *sessionTimeout,
		AllowLoopbackPeers: *allowLoopback,
		AllowPrivatePeers:  *allowPrivate,
		Loops:              *loops,
	}
	if !*noUDP {
		cfg.ListenUDP = *listen
	}
	if !*noTCP {
		cfg.ListenTCP = *listen
	}
	if len(users) > 0 {
		cfg.Users = make(map[string]string, len(users))
	}
	for _, u := range users {
		name, pass, ok := strings.Cut(u, ":")
		if !ok || name == "" {
			return fmt.Errorf("%w: --user %q is not USER:PASS", errUsage, u)
		}
		cfg.Users[name] = pass
	}
	if len(cfg.Users) == 0 && cfg.Secret == "" {
		return fmt.Errorf("%w: give --user USER:PASS or --secret S: the relay never runs without credentials", errUsage)
	}
	for _, s := range relayIPs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("%w: --relay-ip: %v", errUsage, err)
		}
		if ip = ip.Unmap(); ip.Is4() {
			cfg.RelayIP = ip
		} else {
			cfg.RelayIPv6 = ip
		}
	}
	for _, s := range denied {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			ip, err2 := netip.ParseAddr(s)
			if err2 != nil {
				return fmt.Errorf("%w: --denied-peer-ip: %v", errUsage, err)
			}
			p = netip.PrefixFrom(ip, ip.BitLen())
		}
		cfg.DeniedPeers = append(cfg.DeniedPeers, p)
	}
	if *minPort > 65535 || *maxPort > 65535 || *minPort > *maxPort {
		return fmt.Errorf("%w: bad --min-port/--max-port", errUsage)
	}
	cfg.MinPort, cfg.MaxPort = uint16(*minPort), uint16(*maxPort)
	if cfg.PerSourceQuota == 0 {
		cfg.PerSourceQuota = -1 // the flag's 0 is no cap; Config's is the default
	}
	if *tlsListen != "" {
		if *cert == "" || *key == "" {
			return fmt.Errorf("%w: --tls-listen needs --cert and --key", errUsage)
		}
		kp, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			return fmt.Errorf("relay: %w", err)
		}
		cfg.ListenTLS = *tlsListen
		cfg.TLSConfig = &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12}
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	cfg.Logger = log
	if *verbose {
		cfg.OnSessionEnd = func(si relay.SessionInfo) {
			log.Info("session ended", "id", si.ID, "user", si.User, "client", si.Client, "peers", si.Peers,
				"bytes_in", si.BytesIn, "bytes_out", si.BytesOut, "duration", si.End.Sub(si.Start).Round(time.Second), "reason", si.Reason)
		}
	}
	var reg *prometheus.Registry
	if *metricsAddr != "" {
		reg = prometheus.NewRegistry()
		cfg.Metrics = reg
	}
	if *rendezvous = cmpOr(*rendezvous, os.Getenv("PEERLINK_SERVER")); *rendezvous != "" {
		nf := nodeFlags{identity: cmpOr(*identityFile, os.Getenv("PEERLINK_IDENTITY"))}
		id, err := nf.loadIdentity()
		if err != nil {
			return fmt.Errorf("relay: identity: %w", err)
		}
		ann := &rendezvousAnnouncer{url: *rendezvous, id: id, log: log}
		defer ann.Close()
		cfg.Registrar = &relayreg.Registrar{Announcer: ann, NodeID: id.NodeID()}
	}

	srv, err := relay.New(cfg)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if err := srv.Start(); err != nil {
		var ce *relay.ConfigError
		if errors.As(err, &ce) {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		return err
	}
	defer srv.Close()
	addrs := srv.Addrs()
	for _, t := range []relay.Transport{relay.UDP, relay.TCP, relay.TLS} {
		for _, ap := range addrs[t] {
			fmt.Fprintf(stdout, "relay listening on %s %s\n", t, ap)
		}
	}

	if reg != nil {
		ln, err := net.Listen("tcp", *metricsAddr)
		if err != nil {
			return fmt.Errorf("relay: metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		served := make(chan struct{})
		go func() {
			defer close(served)
			hs.Serve(ln)
		}()
		defer func() {
			hs.Close()
			<-served
		}()
	}

	toggle := make(chan os.Signal, 1)
	signal.Notify(toggle, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(toggle)
	for {
		select {
		case <-ctx.Done():
			return nil
		case sig := <-toggle:
			if sig == syscall.SIGUSR1 {
				srv.Disable()
				log.Info("relay disabled: new sessions refused")
			} else {
				srv.Enable()
				log.Info("relay enabled")
			}
		}
	}
}
