// Package punch is peerlink's hole-punching engine: given both peers' NAT profiles, the
// plan step and what the peers exchanged, it finds a working UDP path between them.
//
// An attempt has two phases. Prepare opens the sockets the step needs before the peers
// exchange anything (a fresh socket whose next mapping can be predicted, or the hard side's
// birthday sockets) and returns the Prediction to send to the peer. Run then starts at the
// time both agreed and exchanges connectivity checks: STUN Binding requests authenticated
// with the session key (MESSAGE-INTEGRITY) that every receiver answers with a few
// responses and, as an ICE triggered check, answers back with a check of its own. A check
// that gets a response validates its path. The initiator (nat.SideA) nominates the first
// path it validates and finishes when the responder confirms it; the responder finishes
// on the nomination. So both end on one path, even when one side has hundreds of sockets.
//
// What each side sends follows from the step, its side and both profiles, so the two
// sides agree without negotiating: Direct, Reversal, SimplePunch and Local check between
// the main sockets' candidates; the predicted side of PredictPreservation or
// PredictContiguity checks from a fresh socket toward the peer, which checks the
// predicted ports; in the interleaved techniques both fresh sockets check the other's
// predictions in order; in Birthday the hard side's sockets open their NAT toward the
// easy side, which probes random ports of the hard side's IP. When both NATs map
// endpoint-independently, every technique reduces to simple hole punching between the
// main sockets, which then always works.
//
// The default timing suits real networks (checks retransmitted from 50 ms, one new packet
// per 5 ms, birthday probes every 3 ms); Config can speed it up for an emulator.
// Signaling is not this package's business: the caller moves Prediction values, candidates
// and the start time between the peers.
package punch

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"peerlink/clock"
	"peerlink/mux"
	"peerlink/nat"
	"peerlink/nettype"
)

// Defaults for the zero values of Config.
const (
	// DefaultTimeout bounds one attempt (one round of checks).
	DefaultTimeout = 5 * time.Second
	// DefaultMaxAttempts is how many rounds Run tries before it fails.
	DefaultMaxAttempts = 3
	// DefaultCheckInterval is the first retransmission interval of a check (ICE's Ta
	// is 50 ms per check); retransmissions then grow by half each time, so no
	// destination gets checks faster than this.
	DefaultCheckInterval = 50 * time.Millisecond
	// DefaultPace spaces the first sends of new checks and the hard side's birthday
	// sockets: one new packet per 5 ms, as ICE paces new transactions.
	DefaultPace = 5 * time.Millisecond
	// DefaultAcks is how many responses answer each check: early ones may die on a
	// filter the peer has not opened yet.
	DefaultAcks = 3
	// DefaultAckSpacing spaces those responses, keeping to ICE's one packet per 5 ms
	// per destination together with the triggered check sent between them.
	DefaultAckSpacing = 10 * time.Millisecond
	// DefaultPredictWindow is how many predicted ports a contiguous allocator's peer
	// tries, for mappings other traffic took between the prediction and the punch.
	DefaultPredictWindow = 8
	// DefaultBirthdaySockets is how many sockets the hard side of birthday probing
	// opens.
	DefaultBirthdaySockets = 256
	// DefaultBirthdayProbes caps the easy side's probes per attempt: with 256 sockets
	// behind the hard NAT, 1,024 random ports find one with probability
	// 1-(1-256/64512)^1024 ≈ 98%.
	DefaultBirthdayProbes = 1024
	// DefaultProbeInterval spaces birthday probes. Each goes to a different port, so
	// this is faster than the per-destination pace; 1,024 probes take about 3 s.
	DefaultProbeInterval = 3 * time.Millisecond
)

// MaxBirthdaySockets bounds Config.BirthdaySockets and a peer's Prediction.Sockets.
const MaxBirthdaySockets = 1024

// maxPorts bounds a peer's Prediction.Ports.
const maxPorts = 64

// Errors. Run's failures are *FailError values, which match ErrPunchFailed and their
// cause with errors.Is.
var (
	// ErrPunchFailed: no path was validated and nominated in any attempt.
	ErrPunchFailed = errors.New("punch: hole punching failed")
	// ErrClosed: the Engine or Attempt was closed.
	ErrClosed = errors.New("punch: closed")
	// ErrNotPunchable: the step is not a punching technique (Relay or none): relay
	// instead.
	ErrNotPunchable = errors.New("punch: step is not a hole-punching technique")
	// ErrBadParams wraps every invalid Setup or Params.
	ErrBadParams = errors.New("punch: bad parameters")

	// ErrTimeout is the cause when no path was validated before the last attempt's end.
	ErrTimeout = errors.New("punch: no path validated in time")
	// ErrNotNominated is the cause when the responder validated paths but the
	// initiator never nominated one.
	ErrNotNominated = errors.New("punch: no path nominated by the initiator")
	// ErrUnconfirmed is the cause when the initiator nominated a path but the
	// responder's answers never came back.
	ErrUnconfirmed = errors.New("punch: nominated path not confirmed")
)

// FailError is Run's error when no path was found.
type FailError struct {
	Technique nat.Technique
	// Attempts is how many rounds ran.
	Attempts int
	// Checks and Probes count the checks and birthday probes this side started.
	Checks, Probes int
	// Heard counts valid checks from the peer; Answered, valid responses to ours. Both
	// zero: the peer was never heard (filtered, wrong key, or not running).
	Heard, Answered int
	// Cause is ErrTimeout, ErrNotNominated, ErrUnconfirmed, ErrClosed, or the
	// context's error.
	Cause error
}

func (e *FailError) Error() string {
	return fmt.Sprintf("punch: %s failed after %d attempt(s) (%d checks, %d probes sent; %d checks heard, %d answered): %v",
		e.Technique, e.Attempts, e.Checks, e.Probes, e.Heard, e.Answered, e.Cause)
}

// Unwrap makes errors.Is match ErrPunchFailed and the cause.
func (e *FailError) Unwrap() []error { return []error{ErrPunchFailed, e.Cause} }

// Config configures an Engine. The zero value works on the host's network with the
// real clock and the defaults above; only STUNServer has no default, and the prediction
// techniques need it when the predicted NAT allocates contiguously or maps independently
// of the destination.
type Config struct {
	// Net opens the sockets an attempt needs besides the main one (the fresh socket of
	// port prediction, the birthday sockets); nil means the host's network.
	Net nettype.PacketListener
	// Clock times pacing, retransmissions and deadlines; nil means the real clock.
	Clock clock.Clock
	// Logger receives debug records; nil means quiet.
	Logger *slog.Logger
	// Observe, when set, receives the reflexive address the peer reports for this node
	// on every path Run finds (pass the detector's AddObservation).
	Observe func(netip.AddrPort)
	// STUNServer answers the one Binding request a fresh socket sends to learn its
	// mapping before its next one is predicted.
	STUNServer netip.AddrPort

	// Timeout and MaxAttempts are the defaults of Params' fields of the same name.
	Timeout     time.Duration
	MaxAttempts int
	// CheckInterval, Pace, Acks, AckSpacing, PredictWindow, BirthdaySockets,
	// BirthdayProbes and ProbeInterval tune pacing and effort; zero means the Default
	// of the same name. Pace must be the same on both peers: the easy side of birthday
	// probing waits Prediction.Sockets·Pace for the hard side's sockets, which open one
	// per Pace. The defaults suit real networks; an emulator without latency can run
	// many times faster.
	CheckInterval   time.Duration
	Pace            time.Duration
	Acks            int
	AckSpacing      time.Duration
	PredictWindow   int
	BirthdaySockets int
	BirthdayProbes  int
	ProbeInterval   time.Duration
}

func (c Config) withDefaults() Config {
	c.Clock = clock.Or(c.Clock)
	c.Net = nettype.Or(c.Net)
	c.Timeout = cmp.Or(c.Timeout, DefaultTimeout)
	c.MaxAttempts = cmp.Or(c.MaxAttempts, DefaultMaxAttempts)
	c.CheckInterval = cmp.Or(c.CheckInterval, DefaultCheckInterval)
	c.Pace = cmp.Or(c.Pace, DefaultPace)
	c.Acks = cmp.Or(c.Acks, DefaultAcks)
	c.AckSpacing = cmp.Or(c.AckSpacing, DefaultAckSpacing)
	c.PredictWindow = min(cmp.Or(c.PredictWindow, DefaultPredictWindow), maxPorts)
	c.BirthdaySockets = min(cmp.Or(c.BirthdaySockets, DefaultBirthdaySockets), MaxBirthdaySockets)
	c.BirthdayProbes = cmp.Or(c.BirthdayProbes, DefaultBirthdayProbes)
	c.ProbeInterval = cmp.Or(c.ProbeInterval, DefaultProbeInterval)
	return c
}

// Prediction is what one side tells the other before the start: where its fresh socket's
// packets will come from, or how many birthday sockets it opened. The zero value means
// nothing to predict.
type Prediction struct {
	// IP is the public address of the predicted ports or of the birthday sockets.
	IP netip.Addr `json:"ip,omitzero"`
	// Ports are the likely external ports of the fresh socket's mapping toward the
	// peer, most likely first. The peer checks them in this order, which is what makes
	// two contiguous allocators' predictions interleave.
	Ports []uint16 `json:"ports,omitempty"`
	// Sockets is how many sockets the hard side of birthday probing opened.
	Sockets int `json:"sockets,omitempty"`
}

// Setup describes one side's part in an attempt, as known before the peers exchange
// anything.
type Setup struct {
	// Session identifies the attempt on both sides; Key (16 bytes or more) authenticates
	// its checks. Both are shared secrets the signaling carries.
	Session string
	Key     []byte
	// Step is the plan step (from nat.Strategy on both profiles) and Self which side of
	// the plan this node is: SideA the initiator, SideB the responder.
	Step nat.Step
	Self nat.Side
	// Local is this node's NAT profile and Remote the peer's, the two nat.Strategy
	// planned with.
	Local, Remote nat.Profile
	// Main is the node's socket, made with Engine.NewMux (or whose OnRequest calls
	// Engine.Handle).
	Main *mux.Mux
}

// Params is what Run needs from the peer, and the timing both sides agreed.
type Params struct {
	// RemoteHost are the peer's main socket's local addresses; RemoteReflexive its
	// server-reflexive addresses.
	RemoteHost      []netip.AddrPort
	RemoteReflexive []netip.AddrPort
	// RemotePrediction is the peer's Prepare result.
	RemotePrediction Prediction
	// Start is the agreed start; zero or past means now. Attempt k starts at
	// Start + k·Timeout on both sides.
	Start time.Time
	// Timeout bounds each attempt and MaxAttempts counts them; zero means the Config's.
	Timeout     time.Duration
	MaxAttempts int
}

// Result is the path Run found.
type Result struct {
	// Local is the socket the path leaves from: the main one, or one the attempt opened,
	// which then belongs to the caller (close it when done with the path).
	Local *mux.Mux
	// Remote is where to send to reach the peer.
	Remote netip.AddrPort
	// Reflexive is this side's address as the peer saw it (a peer-reflexive
	// address); zero if the peer did not say.
	Reflexive netip.AddrPort
	// Technique is the plan step's technique.
	Technique nat.Technique
	// RTT is the round trip of a check on the path; zero when this side did not time one.
	RTT time.Duration
	// Attempts is the round that found the path, from 1.
	Attempts int
	// Elapsed is the time from the start (or from Run, if later) to the path.
	Elapsed time.Duration
}

// Engine runs a node's hole-punching attempts. It answers the checks that arrive on the
// node's main socket for its attempts' sessions. It is safe for concurrent use.
type Engine struct {
	cfg Config

	mu       sync.Mutex
	closed   bool
	sessions map[string]*Attempt
}

// New returns an Engine.
func New(cfg Config) *Engine {
	return &Engine{cfg: cfg.withDefaults(), sessions: map[string]*Attempt{}}
}

// NewMux wraps the node's main socket in a Mux whose incoming checks reach the engine's
// attempts; other STUN requests go to cfg.OnRequest. Like mux.New, it owns conn.
func (e *Engine) NewMux(conn net.PacketConn, cfg mux.Config) *mux.Mux {
	next := cfg.OnRequest
	cfg.OnRequest = nil
	if cfg.Clock == nil {
		cfg.Clock = e.cfg.Clock
	}
	return newMux(conn, cfg, func(m *mux.Mux, b []byte, from netip.AddrPort) {
		if !e.Handle(m, b, from) && next != nil {
			next(b, from)
		}
	})
}

// newMux is mux.New with a handler that also gets the Mux itself. The read loop starts
// inside mux.New, so the handler waits until the Mux is known.
func newMux(conn net.PacketConn, cfg mux.Config, h func(*mux.Mux, []byte, netip.AddrPort)) *mux.Mux {
	var m *mux.Mux
	ready := make(chan struct{})
	cfg.OnRequest = func(b []byte, from netip.AddrPort) {
		<-ready
		h(m, b, from)
	}
	m = mux.New(conn, cfg)
	close(ready)
	return m
}

// Handle passes a STUN request that arrived on m to the attempt whose session it names,
// and reports whether it did. Invalid checks for a known session are dropped silently
// (and reported as handled).
func (e *Engine) Handle(m *mux.Mux, msg []byte, from netip.AddrPort) bool {
	dm, err := decode(msg)
	if err != nil {
		return false
	}
	session, _, ok := checkSession(dm)
	if !ok {
		return false
	}
	e.mu.Lock()
	a := e.sessions[session]
	e.mu.Unlock()
	if a == nil {
		return false
	}
	a.handle(m, dm, from)
	return true
}

// Close closes every attempt, ending their lingering too. It is idempotent.
func (e *Engine) Close() error {
	e.mu.Lock()
	e.closed = true
	open := make([]*Attempt, 0, len(e.sessions))
	for _, a := range e.sessions {
		open = append(open, a)
	}
	clear(e.sessions)
	e.mu.Unlock()
	for _, a := range open {
		a.mu.Lock()
		a.linger = time.Time{}
		a.mu.Unlock()
		a.Close()
	}
	return nil
}

func (e *Engine) register(a *Attempt) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	for s, old := range e.sessions {
		if old.expired() {
			delete(e.sessions, s)
		}
	}
	if old := e.sessions[a.session]; old != nil && !old.closedNow() {
		return fmt.Errorf("%w: session %q already has an attempt", ErrBadParams, a.session)
	}
	e.sessions[a.session] = a
	return nil
}

func (e *Engine) unregister(a *Attempt) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.sessions[a.session] == a {
		delete(e.sessions, a.session)
	}
}

func (e *Engine) debug(msg string, args ...any) {
	if e.cfg.Logger != nil {
		e.cfg.Logger.Debug(msg, args...)
	}
}

// withTimeout is context.WithTimeout on the engine's clock; the context's cause is cause.
func withTimeout(ctx context.Context, clk clock.Clock, d time.Duration, cause error) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	t := clk.AfterFunc(d, func() { cancel(cause) })
	return ctx, func() {
		t.Stop()
		cancel(context.Canceled)
	}
}

// sleep waits d on clk, and reports false if ctx ended first.
func sleep(ctx context.Context, clk clock.Clock, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	ch := make(chan struct{})
	t := clk.AfterFunc(d, func() { close(ch) })
	select {
	case <-ch:
		return true
	case <-ctx.Done():
		t.Stop()
		return false
	}
}
