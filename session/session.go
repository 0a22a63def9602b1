// Package session gives two peerlink nodes reliable, ordered, encrypted streams and
// unreliable datagrams: QUIC over a connect.Conn, authenticated by the nodes' keys.
package session

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"peerlink/connect"
	"peerlink/identity"
)

// Errors. A Session's errors wrap one of these (and, for a refused handshake, one of
// ErrPeerMismatch or ErrBadCertificate) with their cause.
var (
	// ErrClosed: the session was closed, by either side, or its connection ended.
	ErrClosed = errors.New("session: closed")
	// ErrHandshake: the QUIC/TLS handshake failed or did not finish in time.
	ErrHandshake = errors.New("session: handshake failed")
	// ErrRefused: the peer refused this node's certificate (it expected another node).
	ErrRefused = errors.New("session: the peer refused this node's identity")
	// ErrDatagramTooLarge: a datagram does not fit in one packet; MaxDatagram says what
	// does.
	ErrDatagramTooLarge = errors.New("session: datagram too large")
	// ErrNoIdentity: Config.Identity is nil.
	ErrNoIdentity = errors.New("session: Config.Identity is required")
)

// Config configures a session. Identity is required; the zero value of every other
// field is its default.
type Config struct {
	// Identity is this node's key. Its certificate is what the peer checks, so it must
	// be the key of the node that made the connect.Conn.
	Identity *identity.Identity
	// Logger receives progress; nil means quiet.
	Logger *slog.Logger
	// KeepAlive is how often an otherwise idle session sends a packet, so that NAT
	// bindings and the relay's permissions stay open. Zero means 15 s, well inside the
	// 30 s that NATs commonly keep an idle UDP binding, or half the local NAT's binding
	// lifetime when connect measured a shorter one; negative means never (probes, when
	// on, still flow).
	KeepAlive time.Duration
	// IdleTimeout ends a session that has heard nothing from its peer for this long.
	// Zero means 30 s. It must exceed the time connect needs to move a dead direct path
	// to the relay (3 s by default).
	IdleTimeout time.Duration
	// HandshakeTimeout bounds Client and Server when ctx has no earlier deadline; zero
	// means 10 s.
	HandshakeTimeout time.Duration
	// ProbeInterval is how often a probe datagram measures jitter and latency for
	// Stats. Zero means 1 s; negative turns probes off (Stats then has QUIC's RTT and
	// loss only).
	ProbeInterval time.Duration
	// MaxIncomingStreams is how many streams the peer may have open at once; zero means
	// 1000.
	MaxIncomingStreams int64
	// DatagramQueue is how many received datagrams wait for ReceiveDatagram before newer
	// ones are dropped; zero means 256.
	DatagramQueue int
}

func (c Config) keepAlive(lifetime time.Duration) time.Duration {
	switch {
	case c.KeepAlive < 0:
		return 0
	case c.KeepAlive > 0:
		return c.KeepAlive
	case lifetime > 0 && lifetime < 30*time.Second:
		return max(lifetime/2, time.Second)
	}
	return 15 * time.Second
}

func orDefault[T ~int | ~int64](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

func durOr(v, def time.Duration) time.Duration {
	if v <= 0 {
		return def
	}
	return v
}

// Datagram kinds: the first byte of every QUIC datagram in a session.
const (
	dgUser  = 0
	dgProbe = 1
	dgEcho  = 2
)

// Session is an encrypted QUIC connection to one peer over a connect.Conn. Its methods
// are safe for concurrent use.
type Session struct {
	conn *connect.Conn
	pc   *PacketConn
	tr   *quic.Transport
	qc   *quic.Conn
	cfg  Config
	log  *slog.Logger

	dgrams    chan []byte
	started   time.Time
	wg        sync.WaitGroup
	closeOnce sync.Once

	mu    sync.Mutex
	probe probeState
}

// Client starts a session as the QUIC client over conn and returns once the handshake
// has finished and the peer has proved it is conn.Peer(). The session owns conn from
// now on: it is closed with the session, or at once when this fails.
func Client(ctx context.Context, conn *connect.Conn, cfg Config) (*Session, error) {
	return start(ctx, conn, cfg, false)
}

// Server is Client for the QUIC server's side.
func Server(ctx context.Context, conn *connect.Conn, cfg Config) (*Session, error) {
	return start(ctx, conn, cfg, true)
}

// New starts a session on either side: the node that made the connection
// (conn.Initiator) is the QUIC client.
func New(ctx context.Context, conn *connect.Conn, cfg Config) (*Session, error) {
	return start(ctx, conn, cfg, !conn.Initiator())
}

func start(ctx context.Context, conn *connect.Conn, cfg Config, server bool) (*Session, error) {
	if cfg.Identity == nil {
		conn.Close()
		return nil, ErrNoIdentity
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	v := newVerifier(conn.Peer())
	tc, err := tlsConfig(cfg.Identity, v, server)
	if err != nil {
		conn.Close()
		return nil, err
	}
	pc := NewPacketConn(conn, cfg.Identity.NodeID())
	tr := &quic.Transport{Conn: pc}
	qcfg := &quic.Config{
		HandshakeIdleTimeout: durOr(cfg.HandshakeTimeout, 10*time.Second),
		MaxIdleTimeout:       durOr(cfg.IdleTimeout, 30*time.Second),
		KeepAlivePeriod:      cfg.keepAlive(time.Duration(conn.LocalProfile().BindingLifetime)),
		MaxIncomingStreams:   orDefault(cfg.MaxIncomingStreams, 1000),
		// The path changes under QUIC (relay, direct) without QUIC knowing, and the
		// relayed path adds TURN framing: probing for a bigger MTU on one path would
		// only lose packets on the next. The default 1280 bytes plus connect's 10 and
		// TURN's 4 fit any IPv4 path of 1400 bytes or more.
		DisablePathMTUDiscovery: true,
		EnableDatagrams:         true,
		// Windows big enough for a fast path with 100 ms of round trip.
		MaxStreamReceiveWindow:     16 << 20,
		MaxConnectionReceiveWindow: 32 << 20,
	}
	hctx, cancel := context.WithTimeoutCause(ctx, qcfg.HandshakeIdleTimeout, fmt.Errorf("%w: no handshake within %v", ErrHandshake, qcfg.HandshakeIdleTimeout))
	defer cancel()
	// A refused certificate ends the handshake at once rather than at the timeout:
	// the QUIC server never hears of handshakes that fail.
	hctx, cancelCause := context.WithCancelCause(hctx)
	defer cancelCause(nil)
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		select {
		case <-v.fail:
			cancelCause(v.failure())
		case <-hctx.Done():
		}
	}()
	var qc *quic.Conn
	if server {
		var ln *quic.Listener
		ln, err = tr.Listen(tc, qcfg)
		if err == nil {
			qc, err = ln.Accept(hctx)
			ln.Close()
		}
	} else {
		qc, err = tr.Dial(hctx, pc.RemoteAddr(), tc, qcfg)
	}
	cancelCause(nil)
	<-watchDone
	if err != nil {
		tr.Close()
		pc.Close()
		conn.Close()
		return nil, handshakeError(err, v, hctx)
	}
	s := &Session{
		conn: conn, pc: pc, tr: tr, qc: qc, cfg: cfg, log: log,
		dgrams:  make(chan []byte, orDefault(cfg.DatagramQueue, 256)),
		started: time.Now(),
	}
	s.wg.Go(s.readDatagrams)
	if iv := cfg.ProbeInterval; iv >= 0 {
		s.wg.Go(func() { s.probeLoop(durOr(iv, time.Second)) })
	}
	role := "client"
	if server {
		role = "server"
	}
	log.Info("session: up", "peer", conn.Peer().Short(), "role", role, "method", conn.Method())
	return s, nil
}

// handshakeError says why a handshake failed, most specific first: our own refusal of
// the peer's certificate, the peer's refusal of ours, a timeout.
func handshakeError(err error, v *verifier, hctx context.Context) error {
	if f := v.failure(); f != nil {
		return f
	}
	var te *quic.TransportError
	if errors.As(err, &te) && te.Remote && te.ErrorCode.IsCryptoError() {
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	if c := context.Cause(hctx); c != nil && errors.Is(c, ErrHandshake) {
		return c
	}
	return fmt.Errorf("%w: %w", ErrHandshake, err)
}

// Peer is the NodeID at the other end, as proved by its certificate.
func (s *Session) Peer() identity.NodeID { return s.conn.Peer() }

// Method says how the connection's current path was made (it changes when connect
// moves between the relay and a direct path).
func (s *Session) Method() connect.Method { return s.conn.Method() }

// Conn is the connection under the session.
func (s *Session) Conn() *connect.Conn { return s.conn }

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.qc.Context().Done() }

// Err says why the session ended; nil while it runs.
func (s *Session) Err() error {
	if s.qc.Context().Err() == nil {
		return nil
	}
	return s.closedErr(context.Cause(s.qc.Context()))
}

func (s *Session) closedErr(err error) error {
	if err == nil || errors.Is(err, ErrClosed) {
		return ErrClosed
	}
	var te *quic.TransportError
	if errors.As(err, &te) && te.Remote && te.ErrorCode.IsCryptoError() {
		// TLS 1.3 lets the client finish before the server has checked its
		// certificate: a refusal comes as the session's end.
		return fmt.Errorf("%w: %w: %w", ErrClosed, ErrRefused, err)
	}
	return fmt.Errorf("%w: %w", ErrClosed, err)
}

// streamErr maps QUIC's errors on a closed connection to ErrClosed, leaving context
// errors as they are.
func (s *Session) streamErr(err error) error {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if s.qc.Context().Err() != nil {
		return s.closedErr(err)
	}
	return err
}

// OpenStream opens a new stream to the peer, waiting while the peer's stream limit is
// reached. The peer sees it in AcceptStream when the first bytes arrive.
func (s *Session) OpenStream(ctx context.Context) (*Stream, error) {
	st, err := s.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, s.streamErr(err)
	}
	return &Stream{s: st, sess: s}, nil
}

// AcceptStream waits for the next stream the peer opened.
func (s *Session) AcceptStream(ctx context.Context) (*Stream, error) {
	st, err := s.qc.AcceptStream(ctx)
	if err != nil {
		return nil, s.streamErr(err)
	}
	return &Stream{s: st, sess: s}, nil
}

// SendDatagram sends b unreliably: it may be lost, duplicated never, reordered rarely.
// It must fit in one packet (about 1,200 bytes; see ErrDatagramTooLarge).
func (s *Session) SendDatagram(b []byte) error {
	msg := make([]byte, 1+len(b))
	msg[0] = dgUser
	copy(msg[1:], b)
	err := s.qc.SendDatagram(msg)
	var tl *quic.DatagramTooLargeError
	if errors.As(err, &tl) {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrDatagramTooLarge, len(b), tl.MaxDatagramPayloadSize-1)
	}
	return s.streamErr(err)
}

// ReceiveDatagram waits for the next datagram from the peer.
func (s *Session) ReceiveDatagram(ctx context.Context) ([]byte, error) {
	select {
	case b := <-s.dgrams:
		return b, nil
	default:
	}
	select {
	case b := <-s.dgrams:
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-s.qc.Context().Done():
		return nil, s.Err()
	}
}

func (s *Session) readDatagrams() {
	ctx := s.qc.Context()
	for {
		b, err := s.qc.ReceiveDatagram(ctx)
		if err != nil {
			return
		}
		if len(b) == 0 {
			continue
		}
		switch b[0] {
		case dgUser:
			select {
			case s.dgrams <- b[1:]:
			default: // a reader that does not keep up loses datagrams
			}
		case dgProbe:
			s.gotProbe(b[1:])
			b[0] = dgEcho
			s.qc.SendDatagram(b)
		case dgEcho:
			s.gotEcho(b[1:])
		}
	}
}

// Close ends the session: the peer is told, streams fail, and the connect.Conn under it
// is closed. It waits for the session's goroutines and is idempotent.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		s.qc.CloseWithError(0, "closed")
		s.tr.Close()
		s.pc.Close()
		s.conn.Close()
		s.wg.Wait()
		s.log.Debug("session: closed", "peer", s.conn.Peer().Short())
	})
	return nil
}

// Stream is a reliable, ordered byte stream in both directions. Read, Write and Close
// may be called from different goroutines, but each of them from one at a time.
type Stream struct {
	s    *quic.Stream
	sess *Session
}

// ID is the stream's QUIC stream ID.
func (st *Stream) ID() int64 { return int64(st.s.StreamID()) }

// Read reads what the peer wrote; io.EOF after the peer's Close.
func (st *Stream) Read(p []byte) (int, error) {
	n, err := st.s.Read(p)
	if err != nil && err != io.EOF {
		err = st.sess.streamErr(err)
	}
	return n, err
}

// Write writes p, blocking while flow control holds it back.
func (st *Stream) Write(p []byte) (int, error) {
	n, err := st.s.Write(p)
	return n, st.sess.streamErr(err)
}

// Close ends this side's writing: the peer reads the rest, then io.EOF. Reading goes
// on until the peer closes too.
func (st *Stream) Close() error { return st.s.Close() }

// CloseRead tells the peer this side reads no more: its writes fail.
func (st *Stream) CloseRead() { st.s.CancelRead(0) }

// Reset abandons the stream both ways: unsent data is dropped and the peer's reads and
// writes fail.
func (st *Stream) Reset() {
	st.s.CancelWrite(0)
	st.s.CancelRead(0)
}

// SetDeadline sets the read and write deadlines.
func (st *Stream) SetDeadline(t time.Time) error { return st.s.SetDeadline(t) }

// SetReadDeadline sets when a blocked Read gives up.
func (st *Stream) SetReadDeadline(t time.Time) error { return st.s.SetReadDeadline(t) }

// SetWriteDeadline sets when a blocked Write gives up.
func (st *Stream) SetWriteDeadline(t time.Time) error { return st.s.SetWriteDeadline(t) }

// probe wire format after the kind byte: sequence number and the sender's send time,
// nanoseconds since its session started.
const probeLen = 4 + 8

func (s *Session) sendProbe(seq uint32) {
	b := make([]byte, 1+probeLen)
	b[0] = dgProbe
	binary.BigEndian.PutUint32(b[1:], seq)
	binary.BigEndian.PutUint64(b[5:], uint64(time.Since(s.started)))
	s.qc.SendDatagram(b)
}
