package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
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
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"peerlink/identity"
	"peerlink/relay"
	"peerlink/relayreg"
	psignal "peerlink/signal"
	"peerlink/store"
	"peerlink/store/memstore"
	"peerlink/store/natsstore"
	"peerlink/stun"
)

// off turns one of serve's servers off when given as its listen address.
const off = "off"

// serveSettings are peerlink serve's settings, as flags. Every flag also comes from the
// environment (PEERLINK_ and the flag's name in capitals, '-' as '_') and from the
// config file (the flag's name as the key); flags win over the environment, which wins
// over the file.
type serveSettings struct {
	store     store.Store // the rendezvous store, shared with the relay's registrations
	storeName string
	config    string
	logFormat string
	logLevel  string
	metrics   string

	listen, cert, key string
	nats              string
	natsReplicas      int
	turnSecret        string
	turnTTL           time.Duration
	turnURIs          stringList
	maxClients        int
	skipSigCheck      bool
	rate              float64
	burst, maxFrame   int

	stunListen  string
	stunAltIP   string
	stunAltPort uint
	stunTCP     bool
	stunRate    float64
	stunBurst   float64

	relayListen, relayTLSListen     string
	relayIPs, relayUsers, relayDeny stringList
	realm                           string
	relayMinPort, relayMaxPort      uint
	relayMaxSessions, relayQuota    int
	relayBandwidth, relayCapacity   int64
	relayIdle                       time.Duration
	relayLoopback, relayPrivate     bool
	relaySourceQuota                int
	relayReqRate, relayReqBurst     float64
	relayNoReqLimit                 bool

	dash *serveDashboard // with --metrics: the servers the dashboard shows
}

func (s *serveSettings) register(fs *flag.FlagSet) {
	fs.StringVar(&s.config, "config", "", "config file: JSON object or KEY=VALUE lines, keys named as these flags (default $PEERLINK_CONFIG)")
	fs.StringVar(&s.logFormat, "log-format", "text", "log format on stderr: text or json")
	fs.StringVar(&s.logLevel, "log-level", "info", "least severe log level: debug, info, warn or error")
	fs.StringVar(&s.metrics, "metrics", "", "serve Prometheus metrics at /metrics, a health check at /healthz and a live dashboard at / on this TCP address (default: none)")

	fs.StringVar(&s.listen, "listen", "", "rendezvous TCP address (default :8080, or :8443 with --cert; off: no rendezvous server)")
	fs.StringVar(&s.cert, "cert", "", "TLS certificate chain (PEM): the rendezvous serves wss://, and the relay's --relay-tls-listen uses it (needs --key)")
	fs.StringVar(&s.key, "key", "", "TLS private key (PEM)")
	fs.StringVar(&s.nats, "nats", "", "NATS server URLs, comma separated: keep rendezvous state in NATS JetStream, shared with other servers (default: in memory, this process only)")
	fs.IntVar(&s.natsReplicas, "nats-replicas", 1, "JetStream replicas of the key-value buckets (3 on a three-node cluster)")
	fs.StringVar(&s.turnSecret, "turn-secret", "", "TURN REST shared secret: the relay accepts, and the rendezvous issues, short-lived credentials made with it (default: a random one for this run)")
	fs.DurationVar(&s.turnTTL, "turn-ttl", time.Hour, "lifetime of the TURN credentials the rendezvous issues")
	fs.Var(&s.turnURIs, "turn-uri", "TURN URI handed out with credentials, e.g. turn:relay.example:3479 (repeatable; default: from --relay-ip)")
	fs.IntVar(&s.maxClients, "max-clients", 0, "most rendezvous clients at once (0: no limit)")
	fs.BoolVar(&s.skipSigCheck, "skip-signature-check", false, "the rendezvous server does not verify routed messages' signatures (receivers still do); about twice the messages per CPU")
	fs.Float64Var(&s.rate, "rate", 20, "rendezvous frames per second each connection may sustain")
	fs.IntVar(&s.burst, "burst", 100, "rendezvous frames a connection may send at once")
	fs.IntVar(&s.maxFrame, "max-frame", 16<<10, "largest rendezvous frame accepted, bytes")

	fs.StringVar(&s.stunListen, "stun-listen", ":3478", "STUN UDP (and TCP) address (off: no STUN server)")
	fs.StringVar(&s.stunAltIP, "stun-alt-ip", "", "second IP for RFC 5780 NAT behaviour discovery; --stun-listen must then name a specific IP")
	fs.UintVar(&s.stunAltPort, "stun-alt-port", 0, "alternate STUN port for RFC 5780 (default: the --stun-listen port plus one)")
	fs.BoolVar(&s.stunTCP, "stun-tcp", true, "also answer STUN over TCP")
	fs.Float64Var(&s.stunRate, "stun-rate", stun.DefaultRate, "STUN requests per second each source IP may sustain")
	fs.Float64Var(&s.stunBurst, "stun-burst", stun.DefaultBurst, "STUN requests a source may send at once")

	fs.StringVar(&s.relayListen, "relay-listen", ":3480", "TURN relay UDP and TCP address (off: no relay)")
	fs.StringVar(&s.relayTLSListen, "relay-tls-listen", "", "TURN over TLS address, e.g. :443 (uses --cert and --key)")
	fs.Var(&s.relayIPs, "relay-ip", "public address relayed sockets bind to and advertise, one IPv4 and one IPv6 at most (repeatable)")
	fs.Var(&s.relayUsers, "relay-user", "fixed TURN credential USER:PASS, besides the TURN REST ones (repeatable)")
	fs.StringVar(&s.realm, "realm", "peerlink", "TURN authentication realm")
	fs.UintVar(&s.relayMinPort, "relay-min-port", 0, "lowest relayed port (0: the kernel's ephemeral range)")
	fs.UintVar(&s.relayMaxPort, "relay-max-port", 0, "highest relayed port")
	fs.IntVar(&s.relayMaxSessions, "relay-max-sessions", 0, "concurrent relay sessions (0: no cap)")
	fs.IntVar(&s.relayQuota, "relay-user-quota", 0, "concurrent relay sessions per user (0: no cap)")
	fs.IntVar(&s.relaySourceQuota, "relay-source-quota", relay.DefaultPerSourceQuota, "concurrent relay sessions per client IP address, IPv6 /64 (0: no cap)")
	fs.Float64Var(&s.relayReqRate, "relay-request-rate", relay.DefaultRequestRate, "TURN requests per second each client IP address may sustain; more are dropped")
	fs.Float64Var(&s.relayReqBurst, "relay-request-burst", relay.DefaultRequestBurst, "TURN requests each client IP address may send at once")
	fs.BoolVar(&s.relayNoReqLimit, "relay-no-request-limit", false, "turn the relay's per-address request limit off (load tests from one machine)")
	fs.Int64Var(&s.relayBandwidth, "relay-bandwidth-limit", 0, "bytes per second per relay session, both directions (0: no limit)")
	fs.Int64Var(&s.relayCapacity, "relay-total-capacity", 0, "bytes per second over all relay sessions (0: no limit)")
	fs.DurationVar(&s.relayIdle, "relay-session-timeout", 0, "end relay sessions idle this long (0: only lifetimes end them)")
	fs.BoolVar(&s.relayLoopback, "relay-allow-loopback-peers", false, "let clients relay to loopback addresses (tests on one machine)")
	fs.BoolVar(&s.relayPrivate, "relay-allow-private-peers", false, "let clients relay to private and link-local addresses (labs)")
	fs.Var(&s.relayDeny, "relay-denied-peer-ip", "a further prefix (CIDR) relay peers may never be in (repeatable)")
}

// envName is the environment variable of a flag.
func envName(flagName string) string {
	return "PEERLINK_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// repeatable reports whether a flag collects several values.
func repeatable(f *flag.Flag) bool {
	_, ok := f.Value.(*stringList)
	return ok
}

// configEntry is one setting from a config file, with where it came from.
type configEntry struct {
	key    string
	values []string
	line   int // 0 for JSON
}

// errConfigSyntax is wrapped by parseServeConfig's errors.
var errConfigSyntax = errors.New("config file")

// parseServeConfig reads a config file: a JSON object whose values are strings, numbers,
// booleans or (for repeatable settings) arrays of them, or lines KEY=VALUE with '#'
// comments. Keys may be written as flags are (turn-secret) or with underscores.
func parseServeConfig(data []byte) ([]configEntry, error) {
	if t := bytes.TrimSpace(data); len(t) > 0 && t[0] == '{' {
		return parseJSONConfig(t)
	}
	var out []configEntry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		k = normKey(k)
		if !ok || k == "" {
			return nil, fmt.Errorf("%w: line %d: want KEY=VALUE, got %q", errConfigSyntax, n, line)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' && v[len(v)-1] == '"' || v[0] == '\'' && v[len(v)-1] == '\'') {
			v = v[1 : len(v)-1]
		}
		out = append(out, configEntry{key: k, values: []string{v}, line: n})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: %v", errConfigSyntax, err)
	}
	return out, nil
}

func normKey(k string) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimSpace(k)), "_", "-")
}

func parseJSONConfig(data []byte) ([]configEntry, error) {
	var m map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%w: JSON: %v", errConfigSyntax, err)
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []configEntry
	for _, k := range keys {
		raw := m[k]
		var vals []string
		var list []json.RawMessage
		if t := bytes.TrimSpace(raw); len(t) > 0 && t[0] == '[' && json.Unmarshal(t, &list) == nil {
			for _, r := range list {
				v, err := jsonScalar(r)
				if err != nil {
					return nil, fmt.Errorf("%w: %q: %v", errConfigSyntax, k, err)
				}
				vals = append(vals, v)
			}
		} else {
			v, err := jsonScalar(raw)
			if err != nil {
				return nil, fmt.Errorf("%w: %q: %v", errConfigSyntax, k, err)
			}
			vals = []string{v}
		}
		if normKey(k) == "" {
			return nil, fmt.Errorf("%w: empty key", errConfigSyntax)
		}
		out = append(out, configEntry{key: normKey(k), values: vals})
	}
	return out, nil
}

// jsonScalar turns a JSON string, number or boolean into the flag text for it.
func jsonScalar(raw json.RawMessage) (string, error) {
	var v any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return "", err
	}
	switch v := v.(type) {
	case string:
		return v, nil
	case json.Number:
		return v.String(), nil
	case bool:
		return strconv.FormatBool(v), nil
	}
	return "", fmt.Errorf("want a string, number or boolean, got %s", raw)
}

// resolveServeSettings fills every flag not given on the command line from the
// environment, then from the config file. Its errors wrap errUsage.
func resolveServeSettings(fs *flag.FlagSet, s *serveSettings, getenv func(string) string) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if !given["config"] {
		s.config = getenv(envName("config"))
	}
	fromEnv := map[string]bool{}
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || given[f.Name] || f.Name == "config" {
			return
		}
		v, ok := lookupEnv(getenv, envName(f.Name))
		if !ok {
			return
		}
		fromEnv[f.Name] = true
		if err = setFlag(f, splitList(f, v)); err != nil {
			err = fmt.Errorf("%w: %s=%q: %v", errUsage, envName(f.Name), v, err)
		}
	})
	if err != nil || s.config == "" {
		return err
	}
	data, rerr := os.ReadFile(s.config)
	if rerr != nil {
		return fmt.Errorf("%w: --config: %v", errUsage, rerr)
	}
	entries, perr := parseServeConfig(data)
	if perr != nil {
		return fmt.Errorf("%w: %s: %v", errUsage, s.config, perr)
	}
	where := func(e configEntry) string {
		if e.line > 0 {
			return fmt.Sprintf("%s:%d", s.config, e.line)
		}
		return s.config
	}
	for _, e := range entries {
		f := fs.Lookup(e.key)
		if f == nil || e.key == "config" {
			return fmt.Errorf("%w: %s: unknown setting %q (settings are named as the flags of 'peerlink serve -h')", errUsage, where(e), e.key)
		}
		if given[f.Name] || fromEnv[f.Name] {
			continue
		}
		vals := e.values
		if len(vals) == 1 {
			vals = splitList(f, vals[0])
		}
		if len(vals) > 1 && !repeatable(f) {
			return fmt.Errorf("%w: %s: %s takes one value", errUsage, where(e), e.key)
		}
		if err := setFlag(f, vals); err != nil {
			return fmt.Errorf("%w: %s: %s: %v", errUsage, where(e), e.key, err)
		}
	}
	return nil
}

func lookupEnv(getenv func(string) string, name string) (string, bool) {
	v := getenv(name)
	return v, v != ""
}

// splitList splits a comma-separated value of a repeatable flag.
func splitList(f *flag.Flag, v string) []string {
	if !repeatable(f) {
		return []string{v}
	}
	var out []string
	for p := range strings.SplitSeq(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func setFlag(f *flag.Flag, vals []string) error {
	for _, v := range vals {
		if err := f.Value.Set(v); err != nil {
			return err
		}
	}
	return nil
}

// newServeLogger builds the slog logger --log-format and --log-level ask for.
func newServeLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("%w: --log-level %q: want debug, info, warn or error", errUsage, level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("%w: --log-format %q: want text or json", errUsage, format)
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var s serveSettings
	s.register(fs)
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink serve [--config FILE] [flags]

Runs the whole server side of peerlink in one process: the rendezvous (signaling)
server over HTTP/WebSocket (wss:// with --cert), a STUN server (RFC 5780 NAT behaviour
discovery with --stun-alt-ip) and a TURN relay (RFC 8656, Linux). The relay and the
rendezvous share the TURN REST secret, so clients need no relay password: the
rendezvous hands them short-lived credentials. Rendezvous state lives in memory, or in
NATS JetStream with --nats so that several servers behind a load balancer share it.
Turn a server off with its listen address set to "off".

Every flag can also be set in the environment, as PEERLINK_ and the flag's name in
capitals with '_' for '-' (PEERLINK_TURN_SECRET, PEERLINK_STUN_ALT_IP), or in the
config file (--config, or $PEERLINK_CONFIG) under the flag's name, as a JSON object or
KEY=VALUE lines ('#' starts a comment; repeatable settings take a JSON array or a
comma-separated list). Flags win over the environment, which wins over the file.

Logs go to stderr (--log-format, --log-level); one line per server to stdout when it
listens. SIGINT or SIGTERM stops every server gracefully; SIGUSR1 stops the relay
taking new sessions (existing ones carry on), SIGUSR2 lets it take them again.
docs/operator.md covers ports, TLS, secrets, NATS clusters and sizing.

Exit status: 0 after SIGINT/SIGTERM, 1 when a server cannot start or fails, 2 bad
usage or configuration.

Examples:
  peerlink serve
  peerlink serve --stun-listen 192.0.2.1:3478 --stun-alt-ip 192.0.2.2 --relay-ip 192.0.2.1 --turn-secret S
  peerlink serve --listen :443 --cert fullchain.pem --key privkey.pem --log-format json
  peerlink serve --nats nats://n1:4222,nats://n2:4222,nats://n3:4222 --nats-replicas 3
  PEERLINK_TURN_SECRET=S peerlink serve --config /etc/peerlink/serve.conf

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
	if err := resolveServeSettings(fs, &s, os.Getenv); err != nil {
		return err
	}
	log, err := newServeLogger(stderr, s.logFormat, s.logLevel)
	if err != nil {
		return err
	}
	return serve(ctx, &s, stdout, log)
}

// server is one of serve's servers: it runs until ctx ends, then stops.
type server struct {
	name string
	run  func(ctx context.Context) error
	stop func()
}

// serve starts every server the settings ask for and runs them until ctx ends or one
// fails.
func serve(ctx context.Context, s *serveSettings, stdout io.Writer, log *slog.Logger) error {
	if err := s.check(); err != nil {
		return err
	}
	if s.turnSecret == "" && s.relayListen != off {
		var b [24]byte
		rand.Read(b[:])
		s.turnSecret = base64.RawURLEncoding.EncodeToString(b[:])
		log.Info("no --turn-secret: using a random one for this run; set one to share it with other relays and rendezvous servers")
	}
	var reg *prometheus.Registry
	var registerer prometheus.Registerer // nil, not a nil *Registry, without --metrics
	if s.metrics != "" {
		reg = prometheus.NewRegistry()
		registerer = reg
		s.dash = newServeDashboard()
	}

	var servers []server
	stopAll := func() {
		for _, sv := range slices.Backward(servers) {
			sv.stop()
		}
	}
	// Each server is started in turn; one that cannot start stops those already up.
	if s.stunListen != off {
		sv, err := s.startSTUN(ctx, stdout, log)
		if err != nil {
			stopAll()
			return err
		}
		servers = append(servers, sv)
	}
	if s.listen != off {
		sv, err := s.openStore(ctx, log)
		if err != nil {
			stopAll()
			return err
		}
		servers = append(servers, sv)
	}
	if s.relayListen != off || s.relayTLSListen != "" {
		sv, err := s.startRelay(stdout, log, registerer)
		if err != nil {
			stopAll()
			return err
		}
		servers = append(servers, sv)
	}
	if s.listen != off {
		sv, err := s.startRendezvous(ctx, stdout, log)
		if err != nil {
			stopAll()
			return err
		}
		servers = append(servers, sv)
	}
	if reg != nil {
		servers = append(servers, server{name: "dashboard", run: s.dash.run, stop: s.dash.stop})
		sv, err := startMetrics(ctx, s.metrics, reg, s.dash, stdout, log)
		if err != nil {
			stopAll()
			return err
		}
		servers = append(servers, sv)
	}
	if len(servers) == 0 {
		return fmt.Errorf("%w: every server is off: nothing to serve", errUsage)
	}
	fmt.Fprintln(stdout, "ready")
	log.Info("serving", "servers", len(servers))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, len(servers))
	var wg sync.WaitGroup
	for _, sv := range servers {
		wg.Go(func() {
			if err := sv.run(ctx); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("%s: %w", sv.name, err)
			}
		})
	}
	var failed error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case failed = <-errc:
		log.Error("a server failed: shutting down", "err", failed)
	}
	cancel()
	stopAll()
	wg.Wait()
	log.Info("stopped")
	return failed
}

// check validates settings that the servers' own configs do not.
func (s *serveSettings) check() error {
	switch {
	case (s.cert == "") != (s.key == ""):
		return fmt.Errorf("%w: --cert and --key go together", errUsage)
	case s.relayTLSListen != "" && s.cert == "":
		return fmt.Errorf("%w: --relay-tls-listen needs --cert and --key", errUsage)
	case s.rate <= 0 || s.burst <= 0 || s.maxFrame <= 0 || s.turnTTL <= 0 || s.natsReplicas <= 0 || s.maxClients < 0:
		return fmt.Errorf("%w: --rate, --burst, --max-frame, --turn-ttl and --nats-replicas must be positive", errUsage)
	case s.stunRate <= 0 || s.stunBurst <= 0:
		return fmt.Errorf("%w: --stun-rate and --stun-burst must be positive", errUsage)
	case s.stunAltPort > 65535 || s.relayMinPort > 65535 || s.relayMaxPort > 65535 || s.relayMinPort > s.relayMaxPort:
		return fmt.Errorf("%w: a port is out of range (--stun-alt-port, --relay-min-port, --relay-max-port)", errUsage)
	case s.relaySourceQuota < 0:
		return fmt.Errorf("%w: --relay-source-quota must not be negative (0: no cap)", errUsage)
	case !s.relayNoReqLimit && (s.relayReqRate <= 0 || s.relayReqBurst <= 0):
		return fmt.Errorf("%w: --relay-request-rate and --relay-request-burst must be positive (use --relay-no-request-limit)", errUsage)
	case s.relayMaxSessions < 0 || s.relayQuota < 0 || s.relayBandwidth < 0 || s.relayCapacity < 0 || s.relayIdle < 0:
		return fmt.Errorf("%w: relay limits must not be negative", errUsage)
	}
	return nil
}

func (s *serveSettings) startSTUN(ctx context.Context, stdout io.Writer, log *slog.Logger) (server, error) {
	cfg := stun.Config{
		Listen: s.stunListen, TCP: s.stunTCP, Software: "peerlink", AltPort: uint16(s.stunAltPort),
		RateLimit: stun.RateLimit{Rate: s.stunRate, Burst: s.stunBurst},
		Logger:    log.With("server", "stun"),
	}
	if s.stunAltIP != "" {
		ip, err := netip.ParseAddr(s.stunAltIP)
		if err != nil {
			return server{}, fmt.Errorf("%w: --stun-alt-ip: %v", errUsage, err)
		}
		cfg.AltIP = ip
	}
	srv, err := stun.Listen(ctx, cfg)
	if err != nil {
		if errors.Is(err, stun.ErrConfig) {
			return server{}, fmt.Errorf("%w: stun: %v", errUsage, err)
		}
		return server{}, fmt.Errorf("stun: %w (is --stun-listen %s free?)", err, s.stunListen)
	}
	if s.dash != nil {
		s.dash.stun = srv
	}
	line := fmt.Sprintf("stun udp %v", srv.UDPAddr(0))
	if srv.RFC5780() {
		line += fmt.Sprintf(" rfc5780 %v %v %v", srv.UDPAddr(stun.ChangePort), srv.UDPAddr(stun.ChangeIP), srv.UDPAddr(stun.ChangeIP|stun.ChangePort))
	}
	if a := srv.TCPAddr(); a.IsValid() {
		line += fmt.Sprintf(" tcp %v", a)
	}
	fmt.Fprintln(stdout, line)
	return server{
		name: "stun",
		run:  srv.Serve,
		stop: func() {
			srv.Close()
			st := srv.Stats()
			log.Info("stun stopped", "server", "stun", "requests", st.Requests, "responses", st.Responses, "rate_limited", st.Dropped.RateLimited)
		},
	}, nil
}

func (s *serveSettings) relayConfig(log *slog.Logger, reg prometheus.Registerer) (relay.Config, error) {
	cfg := relay.Config{
		Realm: s.realm, Secret: s.turnSecret,
		MaxSessions: s.relayMaxSessions, PerUserQuota: s.relayQuota, PerSourceQuota: s.relaySourceQuota,
		RequestLimit:   relay.RequestLimit{Disabled: s.relayNoReqLimit, Rate: s.relayReqRate, Burst: s.relayReqBurst},
		BandwidthLimit: s.relayBandwidth, TotalCapacity: s.relayCapacity, SessionTimeout: s.relayIdle,
		AllowLoopbackPeers: s.relayLoopback, AllowPrivatePeers: s.relayPrivate,
		MinPort: uint16(s.relayMinPort), MaxPort: uint16(s.relayMaxPort),
		Logger: log.With("server", "relay"),
	}
	if s.relaySourceQuota == 0 {
		cfg.PerSourceQuota = -1 // the flag's 0 is "no cap"; the Config's is the default
	}
	cfg.Metrics = reg
	if s.store != nil {
		// Registered in this process's own registry, under a NodeID of its own.
		id, err := identity.Generate()
		if err != nil {
			return cfg, err
		}
		cfg.Registrar = &relayreg.Registrar{Announcer: relayreg.NewRegistry(s.store, nil), NodeID: id.NodeID()}
	}
	if s.relayListen != off {
		cfg.ListenUDP, cfg.ListenTCP = s.relayListen, s.relayListen
	}
	for _, u := range s.relayUsers {
		name, pass, ok := strings.Cut(u, ":")
		if !ok || name == "" {
			return cfg, fmt.Errorf("%w: --relay-user %q is not USER:PASS", errUsage, u)
		}
		if cfg.Users == nil {
			cfg.Users = map[string]string{}
		}
		cfg.Users[name] = pass
	}
	for _, v := range s.relayIPs {
		ip, err := netip.ParseAddr(v)
		if err != nil {
			return cfg, fmt.Errorf("%w: --relay-ip: %v", errUsage, err)
		}
		if ip = ip.Unmap(); ip.Is4() {
			cfg.RelayIP = ip
		} else {
			cfg.RelayIPv6 = ip
		}
	}
	for _, v := range s.relayDeny {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			ip, err2 := netip.ParseAddr(v)
			if err2 != nil {
				return cfg, fmt.Errorf("%w: --relay-denied-peer-ip: %v", errUsage, err)
			}
			p = netip.PrefixFrom(ip, ip.BitLen())
		}
		cfg.DeniedPeers = append(cfg.DeniedPeers, p)
	}
	if s.relayTLSListen != "" {
		kp, err := tls.LoadX509KeyPair(s.cert, s.key)
		if err != nil {
			return cfg, fmt.Errorf("relay: TLS: %w", err)
		}
		cfg.ListenTLS = s.relayTLSListen
		cfg.TLSConfig = &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12}
	}
	return cfg, nil
}

func (s *serveSettings) startRelay(stdout io.Writer, log *slog.Logger, reg prometheus.Registerer) (server, error) {
	cfg, err := s.relayConfig(log, reg)
	if err != nil {
		return server{}, err
	}
	srv, err := relay.New(cfg)
	if err != nil {
		return server{}, fmt.Errorf("%w: relay: %v", errUsage, err)
	}
	if err := srv.Start(); err != nil {
		var ce *relay.ConfigError
		switch {
		case errors.As(err, &ce):
			return server{}, fmt.Errorf("%w: relay: %v", errUsage, err)
		case errors.Is(err, relay.ErrUnsupported):
			return server{}, fmt.Errorf("%w (run with --relay-listen off, or run the relay on Linux)", err)
		}
		return server{}, fmt.Errorf("relay: %w (is --relay-listen %s free?)", err, s.relayListen)
	}
	if s.dash != nil {
		s.dash.relay = srv
	}
	addrs := srv.Addrs()
	for _, t := range []relay.Transport{relay.UDP, relay.TCP, relay.TLS} {
		for _, ap := range addrs[t] {
			fmt.Fprintf(stdout, "relay %s %s\n", t, ap)
			if t == relay.UDP && len(s.turnURIs) == 0 && len(s.relayIPs) > 0 {
				// Clients are told where the relay is along with their credentials.
				for _, ip := range s.relayIPs {
					s.turnURIs = append(s.turnURIs, "turn:"+net.JoinHostPort(ip, strconv.Itoa(int(ap.Port()))))
				}
			}
		}
	}
	return server{
		name: "relay",
		run: func(ctx context.Context) error {
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
						log.Info("relay disabled: new sessions refused", "server", "relay")
					} else {
						srv.Enable()
						log.Info("relay enabled", "server", "relay")
					}
				}
			}
		},
		stop: func() {
			srv.Close()
			st := srv.Stats()
			log.Info("relay stopped", "server", "relay", "sessions_total", st.SessionsTotal, "refused", st.Refused, "bytes_to_peers", st.BytesToPeers, "bytes_to_clients", st.BytesToClients)
		},
	}, nil
}

// openStore opens the rendezvous store: NATS with --nats, else memory. The relay's
// registrations go to the same store, so nodes of this rendezvous find this relay.
func (s *serveSettings) openStore(ctx context.Context, log *slog.Logger) (server, error) {
	rlog := log.With("server", "rendezvous")
	s.storeName = "memory"
	if s.nats != "" {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		ns, err := natsstore.New(sctx, natsstore.Config{URL: s.nats, Replicas: s.natsReplicas, Logger: rlog})
		cancel()
		if err != nil {
			return server{}, fmt.Errorf("rendezvous: NATS store at %s: %w (check --nats and that JetStream is enabled)", s.nats, err)
		}
		s.store, s.storeName = ns, "nats"
	} else {
		s.store = memstore.New(memstore.Config{})
	}
	st := s.store
	return server{
		name: "store",
		run: func(ctx context.Context) error {
			<-ctx.Done()
			return nil
		},
		stop: func() { st.Close() },
	}, nil
}

func (s *serveSettings) startRendezvous(ctx context.Context, stdout io.Writer, log *slog.Logger) (server, error) {
	rlog := log.With("server", "rendezvous")
	st, storeName := s.store, s.storeName
	secret := ""
	if s.relayListen != off || s.relayTLSListen != "" || len(s.turnURIs) > 0 {
		secret = s.turnSecret
	}
	srv, err := psignal.NewServer(psignal.Config{
		CertFile: s.cert, KeyFile: s.key, Store: st,
		TURNSecret: secret, TURNTTL: s.turnTTL, TURNURIs: s.turnURIs,
		MaxFrame: s.maxFrame, RateLimit: s.rate, RateBurst: s.burst, MaxClients: s.maxClients,
		SkipSignatureCheck: s.skipSigCheck, Logger: rlog,
	})
	if err != nil {
		return server{}, fmt.Errorf("rendezvous: %w", err)
	}
	if s.dash != nil {
		s.dash.sig, s.dash.relays = srv, relayreg.NewRegistry(st, nil)
	}
	addr, scheme := s.listen, "ws"
	if s.cert != "" {
		scheme = "wss"
	}
	if addr == "" {
		addr = map[string]string{"ws": ":8080", "wss": ":8443"}[scheme]
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		srv.Close()
		return server{}, fmt.Errorf("rendezvous: %w (is --listen %s free?)", err, addr)
	}
	fmt.Fprintf(stdout, "rendezvous %s://%s/\n", scheme, ln.Addr())
	rlog.Info("rendezvous listening", "url", fmt.Sprintf("%s://%s/", scheme, ln.Addr()), "store", storeName, "turn_credentials", secret != "")
	return server{
		name: "rendezvous",
		run:  func(ctx context.Context) error { return srv.Serve(ctx, ln) },
		stop: func() {
			ln.Close() // when Serve never ran
			srv.Close()
			st := srv.Stats()
			rlog.Info("rendezvous stopped", "routed", st.Routed, "errors", st.Errors, "abusive", st.Abusive)
		},
	}, nil
}

func startMetrics(ctx context.Context, addr string, reg *prometheus.Registry, dash *serveDashboard, stdout io.Writer, log *slog.Logger) (server, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return server{}, fmt.Errorf("metrics: %w (is --metrics %s free?)", err, addr)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	if dash != nil {
		// The dashboard is guarded against other web pages; scrapers of /metrics may
		// use any Host name.
		dmux := http.NewServeMux()
		dash.routes(dmux)
		mux.Handle("/", guard(dmux))
	}
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintf(stdout, "metrics http://%s/metrics\n", ln.Addr())
	if dash != nil {
		fmt.Fprintf(stdout, "dashboard http://%s/\n", ln.Addr())
	}
	log.Info("metrics listening", "addr", ln.Addr())
	return server{
		name: "metrics",
		run: func(ctx context.Context) error {
			err := hs.Serve(ln)
			if errors.Is(err, http.ErrServerClosed) {
				return nil
			}
			return err
		},
		stop: func() { hs.Close() },
	}, nil
}
