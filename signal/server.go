package signal

import (
	"bufio"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/relayreg"
	"peerlink/store"
	"peerlink/store/memstore"
)

// Config configures a Server. The zero value serves plain HTTP with an in-memory store,
// no TURN credentials, and the limits below.
type Config struct {
	// Listen is the address ListenAndServe binds; zero means ":8443" with TLS and
	// ":8080" without. Serve and ServeHTTP ignore it.
	Listen string
	// CertFile and KeyFile, when both set, make ListenAndServe and Serve speak HTTPS
	// (wss://). Empty means plain HTTP (ws://), for labs and for running behind a TLS
	// proxy.
	CertFile, KeyFile string

	// Store holds profiles, presence and relays and routes between servers. nil means
	// a private in-memory store, closed by Close; a given store is not closed.
	Store store.Store

	// TURNSecret is the shared secret of the TURN REST scheme; empty means TURN
	// credential requests fail with turn_unavailable.
	TURNSecret string
	// TURNTTL is how long issued TURN credentials last; zero means one hour.
	TURNTTL time.Duration
	// TURNURIs are handed out with credentials (for example "turn:relay.example:3478").
	TURNURIs []string

	// MaxFrame is the largest frame accepted from a client, in bytes; zero means
	// 16 KiB. A larger frame closes the connection with status 1009.
	MaxFrame int
	// RateLimit is the sustained frames per second allowed per connection; zero means
	// 20. RateBurst is how many may arrive at once; zero means 100. Frames over the
	// limit are answered with rate_limited and count as errors.
	RateLimit float64
	RateBurst int
	// MaxErrors is how many bad frames (malformed, unverifiable, stale, replayed, over
	// the rate) a connection may send before it is closed with too_many_errors; the
	// allowance refills at one per second. Zero means 20.
	MaxErrors int
	// MaxSkew is how far a signed message's timestamp may be from the server's clock;
	// zero means 60 s.
	MaxSkew time.Duration
	// AuthTimeout is how long a new connection has to authenticate; zero means 10 s.
	AuthTimeout time.Duration
	// PingInterval is how often the server pings each client to detect dead
	// connections; zero means 30 s, negative disables pings.
	PingInterval time.Duration
	// WriteTimeout bounds one write to a client; zero means 10 s. A client that does
	// not read for that long is disconnected.
	WriteTimeout time.Duration
	// SendQueue is how many frames may wait for a slow client before senders to it
	// get overloaded; zero means 64.
	SendQueue int
	// MaxClients caps authenticated connections; zero means no cap.
	MaxClients int
	// StoreTimeout bounds each store operation; zero means 5 s.
	StoreTimeout time.Duration
	// SkipSignatureCheck stops the server verifying routed messages' signatures. By
	// default it verifies, so a bad signature is answered at once with bad_signature
	// and never reaches the target; receivers verify either way, so skipping trades
	// that early answer for about 40 µs of CPU per message. Auth and publish are
	// always verified.
	SkipSignatureCheck bool
	// AuthHost is the host clients must sign in the auth handshake; zero means the
	// Host header of their WebSocket request.
	AuthHost string

	// MaxParties is how many parties one node may be in (create or join); zero means
	// 32.
	MaxParties int

	// Relay configures relay sessions between nodes through this server; the zero
	// value relays with RelayConfig's default limits.
	Relay RelayConfig

	// Logger receives connection events; nil means quiet.
	Logger *slog.Logger
	// Clock is the time source; nil means the real clock.
	Clock clock.Clock
}

func (c *Config) setDefaults() {
	c.TURNTTL = cmp.Or(c.TURNTTL, time.Hour)
	c.MaxFrame = cmp.Or(c.MaxFrame, 16<<10)
	c.RateLimit = cmp.Or(c.RateLimit, 20)
	c.RateBurst = cmp.Or(c.RateBurst, 100)
	c.MaxErrors = cmp.Or(c.MaxErrors, 20)
	c.MaxSkew = cmp.Or(c.MaxSkew, 60*time.Second)
	c.AuthTimeout = cmp.Or(c.AuthTimeout, 10*time.Second)
	c.PingInterval = cmp.Or(c.PingInterval, 30*time.Second)
	c.WriteTimeout = cmp.Or(c.WriteTimeout, 10*time.Second)
	c.SendQueue = cmp.Or(c.SendQueue, 64)
	c.StoreTimeout = cmp.Or(c.StoreTimeout, 5*time.Second)
	c.MaxParties = cmp.Or(c.MaxParties, 32)
	c.Relay.setDefaults()
}

// Stats are a server's counters.
type Stats struct {
	Connections   int64  // open WebSocket connections
	Authenticated int64  // of which authenticated
	Routed        uint64 // signed messages delivered to a target
	Errors        uint64 // frames answered with an error
	Abusive       uint64 // connections closed for abuse (bad auth, spoofing, too many errors)
}

// Server is a rendezvous server. It is an http.Handler, so it can be mounted on any
// path of a larger server; ListenAndServe and Serve run it alone.
type Server struct {
	cfg      Config
	log      *slog.Logger
	clock    clock.Clock
	store    store.Store
	ownStore bool
	relays   *relayreg.Registry
	tls      *tls.Config

	mu     sync.Mutex
	conns  map[identity.NodeID]*conn // authenticated, by node
	all    map[*conn]struct{}        // every open connection
	closed bool
	wg     sync.WaitGroup // one per ServeHTTP call that accepted a WebSocket

	nConns, nAuthed            atomic.Int64
	nRouted, nErrors, nAbusive atomic.Uint64

	rl      serverRelay
	members memberCache
}

// NewServer returns a server. It loads the TLS certificate now, so a bad one fails here.
func NewServer(cfg Config) (*Server, error) {
	cfg.setDefaults()
	s := &Server{
		cfg:   cfg,
		log:   cfg.Logger,
		clock: clock.Or(cfg.Clock),
		store: cfg.Store,
		conns: make(map[identity.NodeID]*conn),
		all:   make(map[*conn]struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("signal: give both a certificate and a key, or neither")
	}
	if cfg.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("signal: %w", err)
		}
		s.tls = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	if s.store == nil {
		s.store = memstore.New(memstore.Config{Clock: cfg.Clock})
		s.ownStore = true
	}
	s.relays = relayreg.NewRegistry(s.store, s.clock)
	return s, nil
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	return Stats{
		Connections:   s.nConns.Load(),
		Authenticated: s.nAuthed.Load(),
		Routed:        s.nRouted.Load(),
		Errors:        s.nErrors.Load(),
		Abusive:       s.nAbusive.Load(),
	}
}

// ListenAndServe listens on cfg.Listen and serves until ctx is done.
func (s *Server) ListenAndServe(ctx context.Context) error {
	addr := s.cfg.Listen
	if addr == "" {
		addr = ":8080"
		if s.tls != nil {
			addr = ":8443"
		}
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("signal: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Serve accepts HTTP (or HTTPS, with a certificate) connections on ln until ctx is done,
// then closes ln. Connections already upgraded stay up until Close.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.tls != nil {
		ln = tls.NewListener(ln, s.tls)
	}
	hs := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case <-ctx.Done():
		hs.Close()
		<-errc
		return nil
	case err := <-errc:
		return err
	}
}

// Close disconnects every client (status 1001, shutting_down), waits for their handlers
// and closes the store if the server made it. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	for c := range s.all {
		c.fail(websocket.StatusGoingAway, ErrShuttingDown)
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.stopRelayRouter()
	if s.ownStore {
		return s.store.Close()
	}
	return nil
}

// ServeHTTP upgrades the request to a WebSocket and serves the connection until it ends.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		w.Header().Set("Sec-WebSocket-Protocol", Subprotocol)
		http.Error(w, "peerlink rendezvous: connect with a WebSocket, subprotocol "+Subprotocol, http.StatusUpgradeRequired)
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		http.Error(w, "peerlink rendezvous: shutting down", http.StatusServiceUnavailable)
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()

	hw := &hijackWriter{ResponseWriter: w, timeout: s.cfg.WriteTimeout}
	var heard atomic.Int64 // unix nanoseconds of the last frame or pong from the client
	heard.Store(s.clock.Now().UnixNano())
	ws, err := websocket.Accept(hw, r, &websocket.AcceptOptions{
		Subprotocols: []string{Subprotocol},
		// Clients prove who they are by signature, not by cookies, so a page on any
		// origin may connect.
		InsecureSkipVerify: true,
		OnPingReceived: func(context.Context, []byte) bool {
			// The library answers with a pong on the reader; give that write the same
			// bound as ours, since the deadline is never cleared.
			hw.extendWriteDeadline(s.cfg.WriteTimeout)
			return true
		},
		OnPongReceived: func(context.Context, []byte) { heard.Store(s.clock.Now().UnixNano()) },
	})
	if err != nil {
		s.log.Debug("websocket accept failed", "remote", r.RemoteAddr, "err", err)
		return
	}
	if ws.Subprotocol() != Subprotocol {
		ws.Close(websocket.StatusPolicyViolation, string(CodeUnsupported))
		return
	}
	ws.SetReadLimit(int64(s.cfg.MaxFrame))
	c := s.newConn(ws, cmp.Or(s.cfg.AuthHost, r.Host), r.RemoteAddr)
	c.raw, c.heard = hw, &heard
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ws.Close(websocket.StatusGoingAway, string(CodeShuttingDown))
		return
	}
	s.all[c] = struct{}{}
	s.mu.Unlock()
	s.nConns.Add(1)
	defer s.nConns.Add(-1)
	c.serve()
}

// conn is one client connection. Its reader runs on the ServeHTTP goroutine and owns the
// reader-side state; the writer goroutine owns all writes.
type conn struct {
	s      *Server
	ws     *websocket.Conn
	raw    *hijackWriter // the hijacked transport, for write deadlines
	heard  *atomic.Int64 // when the client was last heard from (frame or pong)
	host   string
	remote string
	nonce  string

	id     identity.NodeID // set by the reader at auth; authed tells other goroutines
	authed atomic.Bool
	detach func()

	out        chan []byte
	quit       chan closeReq
	quitOnce   sync.Once
	failed     atomic.Bool
	writerDone chan struct{}

	// Reader-side state.
	tokens, errTokens float64
	tokensAt, errAt   time.Time
	recent            []string // ring of recent nonces, made on first use
	recentAt          int

	rl connRelay
}

type closeReq struct {
	status websocket.StatusCode
	id     uint64 // request the error answers, if any
	err    *Error
}

// recentNonces is how many of its own nonces a connection is checked against: a cheap
// server-side catch for clients that resend a frame; receivers enforce the full rule.
const recentNonces = 32

func (s *Server) newConn(ws *websocket.Conn, host, remote string) *conn {
	var n [24]byte
	rand.Read(n[:])
	now := s.clock.Now()
	c := &conn{
		s:          s,
		ws:         ws,
		host:       host,
		remote:     remote,
		nonce:      base64.RawURLEncoding.EncodeToString(n[:]),
		out:        make(chan []byte, s.cfg.SendQueue),
		quit:       make(chan closeReq, 1),
		writerDone: make(chan struct{}),
		tokens:     float64(s.cfg.RateBurst),
		errTokens:  float64(s.cfg.MaxErrors),
		tokensAt:   now,
		errAt:      now,
	}
	c.initRelay(now)
	return c
}

// fail closes the connection with status, telling the client why first. Safe from any
// goroutine; only the first call counts.
func (c *conn) fail(status websocket.StatusCode, err *Error) { c.failRequest(0, status, err) }

// failRequest is fail with the error frame answering request id.
func (c *conn) failRequest(id uint64, status websocket.StatusCode, err *Error) {
	c.quitOnce.Do(func() {
		c.failed.Store(true)
		c.quit <- closeReq{status, id, err}
	})
}

// abuse closes the connection for misbehaviour.
func (c *conn) abuse(id uint64, err *Error) {
	c.s.nAbusive.Add(1)
	c.s.nErrors.Add(1)
	c.s.log.Info("closing abusive connection", "remote", c.remote, "node", c.id.Short(), "code", err.Code, "err", err.Message)
	c.failRequest(id, websocket.StatusPolicyViolation, err)
}

func (c *conn) serve() {
	go c.writeLoop()
	defer c.cleanup()
	c.send(c.frame(0, TypeChallenge, challengeBody{
		Nonce:      c.nonce,
		ServerTime: c.s.clock.Now().UnixMilli(),
		MaxFrame:   c.s.cfg.MaxFrame,
		RateLimit:  c.s.cfg.RateLimit,
		RateBurst:  c.s.cfg.RateBurst,
		MaxSkewMS:  c.s.cfg.MaxSkew.Milliseconds(),
	}))
	authTimer := c.s.clock.AfterFunc(c.s.cfg.AuthTimeout, func() {
		if !c.authed.Load() {
			c.s.nAbusive.Add(1)
			c.fail(websocket.StatusPolicyViolation, errorf(CodeAuthTimeout, "no auth within %v", c.s.cfg.AuthTimeout))
		}
	})
	defer authTimer.Stop()
	for {
		typ, r, err := c.ws.Reader(context.Background())
		var data []byte
		if err == nil {
			if typ == websocket.MessageBinary {
				// Relay datagrams, read into a reused buffer: forwarding copies them.
				data, err = c.readBinary(r)
			} else {
				data, err = io.ReadAll(r)
			}
		}
		if err != nil {
			if websocket.CloseStatus(err) == websocket.StatusMessageTooBig || errors.Is(err, websocket.ErrMessageTooBig) {
				c.s.nErrors.Add(1)
			}
			c.s.log.Debug("connection ended", "remote", c.remote, "node", c.id.Short(), "err", err)
			return
		}
		c.heard.Store(c.s.clock.Now().UnixNano())
		if c.failed.Load() {
			continue // closing: drain until the close handshake ends the read
		}
		if typ == websocket.MessageBinary {
			if c.id.IsZero() {
				c.reject(0, errorf(CodeUnauthenticated, "authenticate before sending relay frames"))
				continue
			}
			c.relayData(data)
			continue
		}
		c.handle(data)
	}
}

func (c *conn) cleanup() {
	// Unblocks a writer stuck on a dead peer, and ends the connection if the reader
	// stopped first.
	c.ws.CloseNow()
	c.fail(websocket.StatusNormalClosure, nil)
	<-c.writerDone
	c.closeAllLegs()
	if c.detach != nil {
		c.detach()
	}
	s := c.s
	s.mu.Lock()
	delete(s.all, c)
	current := !c.id.IsZero() && s.conns[c.id] == c
	s.mu.Unlock()
	if current {
		// Last seen is stored before the node counts as offline, so that whoever sees
		// it offline also sees when it left.
		s.putPresence(c.id)
		s.mu.Lock()
		if s.conns[c.id] == c {
			delete(s.conns, c.id)
		}
		s.mu.Unlock()
	}
	if !c.id.IsZero() {
		s.nAuthed.Add(-1)
	}
}

// testHookWriterStall, when set, runs before each frame the writer sends: tests use it
// to stand in for a writer goroutine the scheduler leaves waiting on a busy machine.
var testHookWriterStall func()

// writeLoop owns all writes. Writes are bounded by a deadline on the transport, never by
// a context: coder/websocket closes the connection from a timer when a write's context
// ends mid-write, and on a starved machine that timer fires while the writer merely waits
// for a CPU after its bytes went out, silently dropping a client that reads fine. A
// transport deadline only fails a write the kernel could not take in time.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	var ping <-chan time.Time
	if c.s.cfg.PingInterval > 0 {
		t := time.NewTicker(c.s.cfg.PingInterval)
		defer t.Stop()
		ping = t.C
	}
	pingCtx, stopPing := context.WithCancel(context.Background())
	var pinger sync.WaitGroup
	var pinging atomic.Bool
	defer func() {
		stopPing()
		pinger.Wait()
	}()
	for {
		select {
		case f := <-c.out:
			if testHookWriterStall != nil {
				testHookWriterStall()
			}
			c.raw.extendWriteDeadline(c.s.cfg.WriteTimeout)
			if err := c.ws.Write(context.Background(), websocket.MessageText, f); err != nil {
				c.s.log.Debug("write failed", "remote", c.remote, "node", c.id.Short(), "err", err)
				c.ws.CloseNow()
				return
			}
		case req := <-c.quit:
			c.closeWith(req)
			return
		case <-c.rl.wake:
			if !c.flushRelay() {
				return
			}
		case <-ping:
			// Liveness is judged by what the reader has seen, not by waiting for a
			// pong here: a loaded server may read the pong late, and waiting would
			// stall every frame queued behind the ping.
			silent := c.s.clock.Now().Sub(time.Unix(0, c.heard.Load()))
			if silent > 2*c.s.cfg.PingInterval {
				c.s.log.Debug("ping timeout", "remote", c.remote, "node", c.id.Short(), "silent", silent)
				c.ws.CloseNow()
				return
			}
			if pinging.Swap(true) {
				continue // the last pong is still due
			}
			c.raw.extendWriteDeadline(c.s.cfg.WriteTimeout)
			pinger.Go(func() {
				defer pinging.Store(false)
				// The pong itself is recorded by OnPongReceived; an error here is a
				// closed connection, which the reader reports.
				c.ws.Ping(pingCtx)
			})
		}
	}
}

// closeWith flushes the frames already queued (answers the client is owed, such as the
// rate_limited errors before a too_many_errors), sends the reason and closes. One
// WriteTimeout bounds the whole flush, so a client that stopped reading cannot hold it.
func (c *conn) closeWith(req closeReq) {
	c.raw.extendWriteDeadline(c.s.cfg.WriteTimeout)
	ctx := context.Background()
	ok := true
	for ok {
		select {
		case f := <-c.out:
			ok = c.ws.Write(ctx, websocket.MessageText, f) == nil
		default:
			ok = false
		}
	}
	reason := ""
	if req.err != nil {
		if f, err := marshalFrame(req.id, TypeError, req.err); err == nil {
			c.ws.Write(ctx, websocket.MessageText, f)
		}
		reason = string(req.err.Code)
	}
	c.ws.Close(req.status, reason)
}

// hijackWriter keeps the transport coder/websocket hijacks, so writes can carry a
// deadline on it.
type hijackWriter struct {
	http.ResponseWriter
	timeout time.Duration // a patientConn's second chance
	mu      sync.Mutex
	conn    net.Conn
}

func (h *hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nc, brw, err
	}
	if _, isTLS := nc.(*tls.Conn); !isTLS {
		// A TLS connection is broken by its first write timeout, so only plain
		// transports get a second chance.
		nc = &patientConn{Conn: nc, again: h.timeout}
	}
	h.mu.Lock()
	h.conn = nc
	h.mu.Unlock()
	return nc, brw, nil
}

// patientConn gives a write that hit its deadline one more timeout before failing it. The
// deadline is wall-clock time, so on a saturated machine it can pass while the writer
// waits for a CPU before it ever reaches the kernel; a client that really stopped reading
// still fails the second try, having had at most twice the timeout.
type patientConn struct {
	net.Conn
	again time.Duration
}

func (p *patientConn) Write(b []byte) (int, error) {
	n, err := p.Conn.Write(b)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && p.again > 0 {
		p.Conn.SetWriteDeadline(time.Now().Add(p.again))
		m, err2 := p.Conn.Write(b[n:])
		return n + m, err2
	}
	return n, err
}

// extendWriteDeadline bounds the writes starting now. The deadline is never cleared:
// every write, including the library's pongs, moves it forward first.
func (h *hijackWriter) extendWriteDeadline(d time.Duration) {
	h.mu.Lock()
	nc := h.conn
	h.mu.Unlock()
	if nc != nil {
		nc.SetWriteDeadline(time.Now().Add(d))
	}
}

// send queues a frame for the client, dropping it if the queue is full: the reader must
// never block on its own client.
func (c *conn) send(f []byte) {
	if f == nil {
		return
	}
	select {
	case c.out <- f:
	default:
	}
}

// enqueue is the store.Handler of an authenticated connection: it queues a routed frame.
func (c *conn) enqueue(f []byte) error {
	if c.failed.Load() {
		return store.ErrNoRoute
	}
	if len(f) > 0 && f[0] == relayInternal {
		return c.relayHandle(f)
	}
	select {
	case c.out <- f:
		return nil
	default:
		return errors.New(string(CodeOverloaded))
	}
}

func (c *conn) frame(id uint64, t Type, body any) []byte {
	f, err := marshalFrame(id, t, body)
	if err != nil {
		c.s.log.Error("encoding frame", "type", t, "err", err)
		return nil
	}
	return f
}

func (c *conn) replyError(id uint64, err *Error) { c.send(c.frame(id, TypeError, err)) }

// reject answers a bad frame and spends one of the connection's error allowance.
func (c *conn) reject(id uint64, err *Error) {
	c.s.nErrors.Add(1)
	c.replyError(id, err)
	now := c.s.clock.Now()
	c.errTokens = min(float64(c.s.cfg.MaxErrors), c.errTokens+now.Sub(c.errAt).Seconds())
	c.errAt = now
	c.errTokens--
	if c.errTokens < 0 {
		c.abuse(0, errorf(CodeTooManyErrors, "more than %d bad frames", c.s.cfg.MaxErrors))
	}
}

// allow takes a token from the connection's rate limiter.
func (c *conn) allow() bool {
	now := c.s.clock.Now()
	c.tokens = min(float64(c.s.cfg.RateBurst), c.tokens+now.Sub(c.tokensAt).Seconds()*c.s.cfg.RateLimit)
	c.tokensAt = now
	if c.tokens < 1 {
		return false
	}
	c.tokens--
	return true
}

func asError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return errorf(CodeMalformed, "%v", err)
}

func (c *conn) handle(data []byte) {
	f, err := ParseFrame(data)
	if err != nil {
		c.reject(0, asError(err))
		return
	}
	if !c.allow() {
		c.reject(f.ID, errorf(CodeRateLimited, "over %g frames/s (burst %d)", c.s.cfg.RateLimit, c.s.cfg.RateBurst))
		return
	}
	if c.id.IsZero() {
		if f.Type != TypeAuth {
			c.reject(f.ID, errorf(CodeUnauthenticated, "authenticate first"))
			return
		}
		c.auth(f)
		return
	}
	switch {
	case f.Type.Routed():
		c.route(f)
	case f.Type == TypePublish:
		c.publish(f)
	case f.Type == TypeLookup:
		c.lookup(f)
	case f.Type == TypeTURN:
		c.turn(f)
	case f.Type == TypeRelayRegister:
		c.relayRegister(f)
	case f.Type == TypeRelayList:
		c.relayList(f)
	case f.Type == TypeRelayOpen:
		c.relayOpen(f)
	case f.Type == TypeRelayReady:
		c.relayAccept(f)
	case f.Type == TypeRelayClose:
		c.relayClose(f)
	case f.Type == TypePartyCreate, f.Type == TypePartyJoin, f.Type == TypePartyLeave,
		f.Type == TypePartyKick, f.Type == TypePartyGet, f.Type == TypePartyList:
		c.partyRequest(f)
	case f.Type == TypeAuth:
		c.reject(f.ID, errorf(CodeMalformed, "already authenticated"))
	default:
		c.reject(f.ID, errorf(CodeUnsupported, "unknown message type %.32q", f.Type))
	}
}

func (c *conn) auth(f Frame) {
	var a authBody
	if err := json.Unmarshal(f.Body, &a); err != nil {
		c.abuse(f.ID, errorf(CodeAuthFailed, "auth: %v", err))
		return
	}
	id, err := identity.ParseNodeID(a.NodeID)
	if err != nil {
		c.abuse(f.ID, errorf(CodeAuthFailed, "%v", err))
		return
	}
	if !strings.EqualFold(a.Host, c.host) {
		c.abuse(f.ID, errorf(CodeAuthFailed, "signed for host %.64q, this server is %q", a.Host, c.host))
		return
	}
	sig, err := hex.DecodeString(a.Signature)
	if err != nil || !id.Verify(AuthSigningInput(a.Host, c.nonce, id), sig) {
		c.abuse(f.ID, errorf(CodeAuthFailed, "challenge signature does not verify"))
		return
	}
	s := c.s
	s.mu.Lock()
	if s.cfg.MaxClients > 0 && len(s.conns) >= s.cfg.MaxClients && s.conns[id] == nil {
		s.mu.Unlock()
		c.failRequest(f.ID, websocket.StatusTryAgainLater, errorf(CodeServerFull, "%d clients connected", s.cfg.MaxClients))
		return
	}
	old := s.conns[id]
	s.conns[id] = c
	c.id = id
	c.authed.Store(true)
	s.mu.Unlock()
	s.nAuthed.Add(1)
	if old != nil {
		old.fail(statusReplaced, ErrReplaced)
	}
	detach, err := s.store.Attach(id.String(), c.enqueue)
	if err != nil {
		s.log.Error("store attach failed", "node", id.Short(), "err", err)
		c.fail(websocket.StatusInternalError, errorf(CodeInternal, "store unavailable"))
		return
	}
	c.detach = detach
	s.putPresence(id)
	c.send(c.frame(f.ID, TypeWelcome, welcomeBody{NodeID: id.String(), ServerTime: s.clock.Now().UnixMilli()}))
	s.touchParties(id)
	s.log.Debug("authenticated", "remote", c.remote, "node", id.Short())
}

// statusReplaced closes a connection whose node connected again to the same server.
const statusReplaced websocket.StatusCode = 4000

func (s *Server) putPresence(id identity.NodeID) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StoreTimeout)
	defer cancel()
	b, _ := json.Marshal(presenceRecord{LastSeen: s.clock.Now().UnixMilli()})
	if err := s.store.Put(ctx, store.Presence, id.String(), b); err != nil {
		s.log.Warn("presence update failed", "node", id.Short(), "err", err)
	}
}

// checkSigned applies the checks every signed message from this connection gets.
func (c *conn) checkSigned(f Frame, m *Message, verify bool) bool {
	if m.From != c.id {
		c.abuse(f.ID, errorf(CodeSpoofed, "fromNodeID %s is not this connection's node %s", m.From.Short(), c.id.Short()))
		return false
	}
	if d := c.s.clock.Now().Sub(m.Time); d > c.s.cfg.MaxSkew || d < -c.s.cfg.MaxSkew {
		c.reject(f.ID, errorf(CodeStale, "timestamp is %v from the server's clock (allowed %v)", d.Round(time.Millisecond), c.s.cfg.MaxSkew))
		return false
	}
	if verify {
		if err := m.verifySignature(); err != nil {
			c.reject(f.ID, asError(err))
			return false
		}
	}
	if c.recent == nil {
		c.recent = make([]string, recentNonces)
	}
	for _, n := range c.recent {
		if n == m.Nonce {
			c.reject(f.ID, errorf(CodeReplay, "nonce %s already used", m.Nonce))
			return false
		}
	}
	c.recent[c.recentAt] = m.Nonce
	c.recentAt = (c.recentAt + 1) % recentNonces
	return true
}

func (c *conn) route(f Frame) {
	m, err := decodeEnvelope(f.Type, f.Body)
	if err != nil {
		c.reject(f.ID, asError(err))
		return
	}
	if !c.checkSigned(f, m, !c.s.cfg.SkipSignatureCheck) {
		return
	}
	if err := c.s.checkShared(c.id, m.To); err != nil {
		c.replyError(f.ID, err)
		return
	}
	frame := AppendFrame(make([]byte, 0, len(f.Body)+len(f.Type)+5), 0, f.Type, f.Body)
	if err := c.s.deliver(m.To, frame); err != nil {
		c.replyError(f.ID, err)
		return
	}
	c.s.nRouted.Add(1)
	c.send(AppendFrame(nil, f.ID, TypeOK, []byte("{}")))
}

// deliver hands frame to node: directly when it is connected here, else through the
// store's router.
func (s *Server) deliver(node identity.NodeID, frame []byte) *Error {
	s.mu.Lock()
	target := s.conns[node]
	s.mu.Unlock()
	var err error
	if target != nil {
		err = store.Reject(target.enqueue(frame))
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StoreTimeout)
		err = s.store.Route(ctx, node.String(), frame)
		cancel()
	}
	var re *store.RejectedError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, store.ErrNoRoute):
		return errorf(CodePeerOffline, "%s is not connected", node.Short())
	case errors.As(err, &re) && Code(re.Reason) == CodeOverloaded:
		return errorf(CodeOverloaded, "%s is not keeping up", node.Short())
	default:
		s.log.Warn("routing failed", "node", node.Short(), "err", err)
		return errorf(CodeInternal, "routing failed")
	}
}

func (c *conn) storeCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.s.cfg.StoreTimeout)
}

func (c *conn) publish(f Frame) {
	m, err := DecodeMessage(TypePublish, f.Body)
	if err != nil {
		c.reject(f.ID, asError(err))
		return
	}
	if !c.checkSigned(f, m, true) {
		return
	}
	ctx, cancel := c.storeCtx()
	defer cancel()
	if err := c.s.store.Put(ctx, store.Profiles, c.id.String(), f.Body); err != nil {
		c.s.log.Warn("publish failed", "node", c.id.Short(), "err", err)
		c.replyError(f.ID, errorf(CodeInternal, "store unavailable"))
		return
	}
	c.send(AppendFrame(nil, f.ID, TypeOK, []byte("{}")))
}

func (c *conn) lookup(f Frame) {
	var l lookupBody
	if err := json.Unmarshal(f.Body, &l); err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "lookup: %v", err))
		return
	}
	id, err := identity.ParseNodeID(l.NodeID)
	if err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "lookup: %v", err))
		return
	}
	if err := c.s.checkShared(c.id, id); err != nil {
		c.replyError(f.ID, err)
		return
	}
	s := c.s
	ctx, cancel := c.storeCtx()
	defer cancel()
	s.mu.Lock()
	online := s.conns[id] != nil
	s.mu.Unlock()
	if !online {
		if online, err = s.store.Online(ctx, id.String()); err != nil {
			s.log.Warn("presence check failed", "node", id.Short(), "err", err)
		}
	}
	p := peerBody{NodeID: id.String(), Online: online}
	pres, perr := s.store.Get(ctx, store.Presence, id.String())
	var rec presenceRecord
	if perr == nil && json.Unmarshal(pres, &rec) == nil {
		p.LastSeen = rec.LastSeen
	}
	prof, ferr := s.store.Get(ctx, store.Profiles, id.String())
	if ferr == nil {
		p.Published = prof
	}
	for _, err := range []error{perr, ferr} {
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			s.log.Warn("lookup failed", "node", id.Short(), "err", err)
			c.replyError(f.ID, errorf(CodeInternal, "store unavailable"))
			return
		}
	}
	if !online && p.LastSeen == 0 && p.Published == nil {
		c.replyError(f.ID, errorf(CodeNotFound, "%s is not known here", id.Short()))
		return
	}
	c.send(c.frame(f.ID, TypePeer, p))
}

func (c *conn) turn(f Frame) {
	s := c.s
	if s.cfg.TURNSecret == "" {
		c.replyError(f.ID, errorf(CodeTURNUnavailable, "this server issues no TURN credentials"))
		return
	}
	cred := NewTURNCredentials(s.cfg.TURNSecret, c.id, s.clock.Now(), s.cfg.TURNTTL)
	cred.URIs = s.cfg.TURNURIs
	c.send(c.frame(f.ID, TypeTURNCredentials, cred))
}

func (c *conn) relayRegister(f Frame) {
	var r relayRegisterBody
	if err := json.Unmarshal(f.Body, &r); err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "relayRegister: %v", err))
		return
	}
	ctx, cancel := c.storeCtx()
	defer cancel()
	info := relayreg.Info{NodeID: c.id, Endpoints: r.Endpoints, Capacity: r.Capacity, Load: r.Load}
	if err := c.s.relays.Register(ctx, info); err != nil {
		if errors.Is(err, relayreg.ErrInvalid) {
			c.reject(f.ID, errorf(CodeInvalid, "%v", err))
			return
		}
		c.replyError(f.ID, errorf(CodeInternal, "store unavailable"))
		return
	}
	c.send(AppendFrame(nil, f.ID, TypeOK, []byte("{}")))
}

func (c *conn) relayList(f Frame) {
	ctx, cancel := c.storeCtx()
	defer cancel()
	list, err := c.s.relays.ListRelays(ctx)
	if err != nil {
		c.replyError(f.ID, errorf(CodeInternal, "store unavailable"))
		return
	}
	c.send(c.frame(f.ID, TypeRelays, relaysBody{Relays: list}))
}
