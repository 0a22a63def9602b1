package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/session"
)

// Tunnel wire format: every stream starts with a request line from the forwarding side,
// "peerlink-tunnel/1 check" (may I?) or "peerlink-tunnel/1 connect" (a TCP connection),
// which the exposing side answers with "ok" or "error <why>". After an ok to connect the
// stream carries the TCP connection's bytes both ways; each direction's end (TCP
// half-close) is the stream's end in that direction. The request also makes the stream,
// which QUIC opens lazily, appear at once for protocols where the server speaks first.
const (
	tunnelProto   = "peerlink-tunnel/1"
	maxTunnelLine = 1 << 10
)

var (
	// errTunnelProto: a stream that does not speak the tunnel's protocol.
	errTunnelProto = errors.New("not a peerlink tunnel stream")
	// errTunnelRefused: the exposing side said no.
	errTunnelRefused = errors.New("refused by the tunnel's far end")
)

// parseTunnelRequest returns the request's kind: "check" or "connect".
func parseTunnelRequest(line []byte) (string, error) {
	proto, kind, ok := strings.Cut(string(line), " ")
	if !ok || proto != tunnelProto {
		return "", fmt.Errorf("%w (is the other end 'peerlink tunnel <node> --local ADDR'?)", errTunnelProto)
	}
	switch kind {
	case "check", "connect":
		return kind, nil
	}
	return "", fmt.Errorf("%w: unknown request %q", errTunnelProto, kind)
}

// parseTunnelReply returns nil for ok, else the far end's reason.
func parseTunnelReply(line []byte) error {
	s := string(line)
	if s == "ok" {
		return nil
	}
	if why, ok := strings.CutPrefix(s, "error "); ok {
		return fmt.Errorf("%w: %s", errTunnelRefused, printable(why))
	}
	return fmt.Errorf("%w: unexpected reply %q", errTunnelProto, s)
}

// tunnelError is the reply line for a refusal; why must fit on it.
func tunnelError(why string) []byte {
	why = strings.NewReplacer("\r", " ", "\n", " ").Replace(why)
	if len(why) > maxTunnelLine-16 {
		why = why[:maxTunnelLine-16]
	}
	return []byte("error " + why + "\n")
}

// tunnelEvent is one line of --json output.
type tunnelEvent struct {
	Event    string    `json:"event"` // ready, joined, left, refused, open, close, method
	Time     time.Time `json:"time"`
	Node     string    `json:"node,omitempty"`
	Peer     string    `json:"peer,omitempty"`
	Local    string    `json:"local,omitempty"`
	Expose   string    `json:"expose,omitempty"`
	Method   string    `json:"method,omitempty"`
	Conn     int64     `json:"conn,omitempty"`
	Sent     *int64    `json:"sent,omitempty"`     // bytes towards the peer
	Received *int64    `json:"received,omitempty"` // bytes from the peer
	Error    string    `json:"error,omitempty"`
}

// tunnelLog prints events: JSON lines with --json, else text lines.
type tunnelLog struct {
	json bool
	mu   sync.Mutex
	w    io.Writer
}

func (l *tunnelLog) emit(ev tunnelEvent, format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ev.Time = time.Now()
	if l.json {
		ev.Time = ev.Time.UTC()
		writeJSONLine(l.w, ev)
		return
	}
	fmt.Fprintf(l.w, "%s %s\n", clockTime(ev.Time), fmt.Sprintf(format, args...))
}

func runTunnel(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink tunnel", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	expose := fs.String("expose", "", "expose this TCP address (HOST:PORT) to peers: each stream they open becomes a connection to it")
	var allow stringList
	fs.Var(&allow, "allow", "with --expose: only these nodes may connect (repeatable or comma separated; default: any node)")
	local := fs.String("local", "", "with <node>: listen on this TCP address (HOST:PORT); each connection to it goes to what <node> exposes")
	timeout := fs.Duration("timeout", 10*time.Second, "give up connecting (to the node, or the exposed address) after this long")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink tunnel --expose HOST:PORT [--allow NODE ...] [node flags] [--json]
       peerlink tunnel <node> --local HOST:PORT [node flags] [--json]

A TCP tunnel across NATs, like ssh -L without a server. On the side with the service,
--expose accepts nodes and turns every stream they open into a TCP connection to
HOST:PORT, and only to it: peers cannot choose another address. On the other side,
<node> --local listens on HOST:PORT and carries each TCP connection to it over one
encrypted session to <node>, both ways, half-closes included; any number at once.
Connections, the peer joining and leaving and the connection's method (direct, punched,
relayed) are logged on stdout, as JSON lines with --json.

Exit status: 0 after Ctrl-C or SIGTERM, 1 when it cannot start, is refused, or (with
<node>) the connection to the node is lost, 2 bad usage.

Examples:
  peerlink tunnel --expose 127.0.0.1:8080 --allow pl7xk...     # prints its NodeID
  peerlink tunnel pl4bq... --local 127.0.0.1:9000              # then: curl localhost:9000
  peerlink tunnel pl4bq... --local 127.0.0.1:2222 & ssh -p 2222 localhost

Flags:
`)
		fs.PrintDefaults()
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	var target identity.NodeID
	switch {
	case *expose != "" && *local != "":
		return fmt.Errorf("%w: --expose and --local are the two ends of a tunnel: pass one", errUsage)
	case *expose != "" && len(pos) != 0:
		return fmt.Errorf("%w: --expose takes no <node>: the nodes come to it", errUsage)
	case *expose != "":
		if _, _, err := net.SplitHostPort(*expose); err != nil {
			return fmt.Errorf("%w: --expose %q: want HOST:PORT: %v", errUsage, *expose, err)
		}
	case *local == "" || len(pos) != 1:
		return fmt.Errorf("%w: want --expose HOST:PORT, or <node> --local HOST:PORT", errUsage)
	case len(allow) != 0:
		return fmt.Errorf("%w: --allow goes with --expose", errUsage)
	default:
		if target, err = identity.ParseNodeID(pos[0]); err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		if _, _, err := net.SplitHostPort(*local); err != nil {
			return fmt.Errorf("%w: --local %q: want HOST:PORT: %v", errUsage, *local, err)
		}
	}
	allowed, err := parseNodeList(allow, "--allow")
	if err != nil {
		return err
	}
	if *timeout <= 0 {
		return fmt.Errorf("%w: --timeout must be positive", errUsage)
	}
	if err := nf.resolve(); err != nil {
		return err
	}
	log := &tunnelLog{json: nf.json, w: stdout}
	if *expose != "" {
		p, err := startClient(ctx, &nf, stderr)
		if err != nil {
			return err
		}
		defer p.Close()
		e := &exposer{p: p, addr: *expose, allowed: allowed, timeout: *timeout, log: log, stderr: stderr}
		return e.run(ctx)
	}
	// Listening first fails fast on a port in use, before the slower connecting.
	ln, err := net.Listen("tcp", *local)
	if err != nil {
		return fmt.Errorf("cannot listen on --local %s: %w (is the port in use? pick another)", *local, err)
	}
	defer ln.Close()
	p, err := startClient(ctx, &nf, stderr)
	if err != nil {
		return err
	}
	defer p.Close()
	f := &forwarder{p: p, target: target, ln: ln, timeout: *timeout, log: log, stderr: stderr}
	return f.run(ctx)
}

// exposer is the --expose end of a tunnel.
type exposer struct {
	p       *clientNode
	addr    string
	allowed map[identity.NodeID]bool // nil: any node
	timeout time.Duration
	log     *tunnelLog
	stderr  io.Writer
	conns   atomic.Int64
	dialer  net.Dialer
}

func (e *exposer) run(ctx context.Context) error {
	who := "any node"
	if e.allowed != nil {
		who = fmt.Sprintf("%d allowed node(s)", len(e.allowed))
	}
	fmt.Fprintf(e.stderr, "peerlink tunnel: listening as %s; exposing %s to %s\n", e.p.id.NodeID(), e.addr, who)
	if e.allowed == nil {
		fmt.Fprintf(e.stderr, "peerlink tunnel: any node that knows this NodeID can reach %s: pass --allow NODE to restrict it\n", e.addr)
	}
	e.log.emit(tunnelEvent{Event: "ready", Node: e.p.id.NodeID().String(), Expose: e.addr}, "exposing %s as %s", e.addr, e.p.id.NodeID())
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := e.p.node.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accepting: %w", err)
		}
		wg.Go(func() { e.servePeer(ctx, conn) })
	}
}

// servePeer serves one node's streams until its session ends.
func (e *exposer) servePeer(ctx context.Context, conn *connect.Conn) {
	sess, err := e.p.secure(ctx, conn, e.timeout)
	if err != nil {
		fmt.Fprintf(e.stderr, "peerlink tunnel: %v\n", err)
		return
	}
	var wg sync.WaitGroup
	defer func() {
		sess.Close() // ends the streams, so their goroutines
		wg.Wait()
	}()
	peer := sess.Peer()
	allowed := e.allowed == nil || e.allowed[peer]
	if allowed {
		e.log.emit(tunnelEvent{Event: "joined", Peer: peer.String(), Method: sess.Method().String()}, "%s joined (%s)", peer.Short(), sess.Method())
	} else {
		e.log.emit(tunnelEvent{Event: "refused", Peer: peer.String(), Error: "not an --allow node"}, "%s refused: not an --allow node", peer)
	}
	method := sess.Method()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	ended := make(chan struct{}) // closed when the session takes no more streams
	wg.Go(func() {
		defer close(ended)
		for {
			st, err := sess.AcceptStream(ctx)
			if err != nil {
				return
			}
			wg.Go(func() { e.serveStream(ctx, peer, allowed, st) })
		}
	})
	for {
		select {
		case <-ended:
			if allowed {
				reason := "closed by the peer"
				switch err := sess.Err(); {
				case ctx.Err() != nil:
					reason = "tunnel stopping"
				case err != nil && !peerClosed(err):
					reason = err.Error()
				}
				e.log.emit(tunnelEvent{Event: "left", Peer: peer.String(), Error: reason}, "%s left (%s)", peer.Short(), reason)
			}
			return
		case <-tick.C:
			if m := sess.Method(); m != method && allowed {
				e.log.emit(tunnelEvent{Event: "method", Peer: peer.String(), Method: m.String()}, "connection to %s now %s (was %s)", peer.Short(), m, method)
				method = m
			}
		}
	}
}

// serveStream answers one stream: a check, or a connection to the exposed address.
func (e *exposer) serveStream(ctx context.Context, peer identity.NodeID, allowed bool, st *session.Stream) {
	br := bufio.NewReader(st)
	st.SetReadDeadline(time.Now().Add(e.timeout))
	line, err := readLine(br, maxTunnelLine)
	var kind string
	if err == nil {
		kind, err = parseTunnelRequest(line)
	}
	if err != nil {
		fmt.Fprintf(e.stderr, "peerlink tunnel: %s: %v\n", peer.Short(), err)
		st.Reset()
		return
	}
	st.SetReadDeadline(time.Time{})
	refuse := func(why string) {
		st.Write(tunnelError(why))
		st.Close()
		st.CloseRead()
	}
	if !allowed {
		refuse(fmt.Sprintf("node %s may not use this tunnel (its owner can add --allow %s)", peer, peer))
		return
	}
	if kind == "check" {
		st.Write([]byte("ok\n"))
		st.Close()
		st.CloseRead()
		return
	}
	id := e.conns.Add(1)
	dctx, cancel := context.WithTimeout(ctx, e.timeout)
	c, err := e.dialer.DialContext(dctx, "tcp", e.addr)
	cancel()
	if err != nil {
		e.log.emit(tunnelEvent{Event: "close", Peer: peer.String(), Conn: id, Error: err.Error()}, "#%d from %s: cannot reach %s: %v", id, peer.Short(), e.addr, err)
		refuse(fmt.Sprintf("%s cannot reach %s: %v (is the service running?)", e.p.id.NodeID().Short(), e.addr, err))
		return
	}
	if _, err := st.Write([]byte("ok\n")); err != nil {
		c.Close()
		st.Reset()
		return
	}
	e.log.emit(tunnelEvent{Event: "open", Peer: peer.String(), Conn: id}, "#%d from %s to %s", id, peer.Short(), e.addr)
	received, sent, err := pipe(st, br, c.(*net.TCPConn))
	ev := tunnelEvent{Event: "close", Peer: peer.String(), Conn: id, Sent: &sent, Received: &received}
	if err != nil {
		ev.Error = err.Error()
	}
	e.log.emit(ev, "#%d from %s closed: %s in, %s out%s", id, peer.Short(), formatBytes(received), formatBytes(sent), errSuffix(err))
}

func errSuffix(err error) string {
	if err == nil {
		return ""
	}
	return " (" + err.Error() + ")"
}

// pipe copies st (read through br) to c and c to st until both directions have ended,
// passing each direction's end on as a half-close. An error in either direction aborts
// both. It closes c.
func pipe(st *session.Stream, br io.Reader, c *net.TCPConn) (fromStream, toStream int64, err error) {
	var wg sync.WaitGroup
	var upErr error
	wg.Go(func() {
		toStream, upErr = io.Copy(st, c)
		if upErr != nil {
			st.Reset()
			c.Close()
			return
		}
		st.Close()
	})
	fromStream, err = io.Copy(c, br)
	if err != nil {
		st.Reset()
		c.Close()
	} else {
		c.CloseWrite()
	}
	wg.Wait()
	c.Close()
	if err != nil && upErr != nil {
		return fromStream, toStream, err // one cause, seen from both ends
	}
	return fromStream, toStream, errors.Join(err, upErr)
}

// forwarder is the <node> --local end of a tunnel.
type forwarder struct {
	p       *clientNode
	target  identity.NodeID
	ln      net.Listener
	timeout time.Duration
	log     *tunnelLog
	stderr  io.Writer
	conns   atomic.Int64
}

func (f *forwarder) run(ctx context.Context) error {
	sess, err := f.p.dial(ctx, f.target, f.timeout, "peerlink tunnel --expose HOST:PORT")
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer func() {
		f.ln.Close()
		sess.Close() // ends the streams, so their goroutines
		wg.Wait()
	}()
	if err := f.check(ctx, sess); err != nil {
		return err
	}
	method := sess.Method()
	f.log.emit(tunnelEvent{Event: "ready", Node: f.p.id.NodeID().String(), Peer: f.target.String(), Local: f.ln.Addr().String(), Method: method.String()},
		"forwarding %s to %s (%s)", f.ln.Addr(), f.target.Short(), method)
	wg.Go(func() {
		for {
			c, err := f.ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { f.forward(ctx, sess, c.(*net.TCPConn)) })
		}
	})
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sess.Done():
			err := sess.Err()
			reason := err.Error()
			if peerClosed(err) {
				reason = "closed by the peer"
			}
			f.log.emit(tunnelEvent{Event: "left", Peer: f.target.String(), Error: reason}, "%s left (%s)", f.target.Short(), reason)
			if peerClosed(err) {
				return fmt.Errorf("%s closed the tunnel: its 'peerlink tunnel --expose' stopped: %w", f.target.Short(), err)
			}
			return fmt.Errorf("connection to %s lost: %w (is 'peerlink tunnel --expose' still running there?)", f.target.Short(), err)
		case <-tick.C:
			if m := sess.Method(); m != method {
				f.log.emit(tunnelEvent{Event: "method", Peer: f.target.String(), Method: m.String()}, "connection to %s now %s (was %s)", f.target.Short(), m, method)
				method = m
			}
		}
	}
}

// check asks the far end whether this node may use the tunnel, so that a refusal shows
// at once rather than at the first TCP connection.
func (f *forwarder) check(ctx context.Context, sess *session.Session) error {
	st, err := sess.OpenStream(ctx)
	if err != nil {
		return fmt.Errorf("stream to %s: %w", f.target.Short(), err)
	}
	defer st.Reset()
	st.SetDeadline(time.Now().Add(f.timeout))
	if _, err := st.Write([]byte(tunnelProto + " check\n")); err != nil {
		return fmt.Errorf("stream to %s: %w", f.target.Short(), err)
	}
	line, err := readLine(bufio.NewReader(st), maxTunnelLine)
	if err != nil {
		return fmt.Errorf("no answer from %s within %v (is it running 'peerlink tunnel --expose'?): %w", f.target.Short(), f.timeout, err)
	}
	return parseTunnelReply(line)
}

// forward carries one local TCP connection to the far end.
func (f *forwarder) forward(ctx context.Context, sess *session.Session, c *net.TCPConn) {
	defer c.Close()
	id := f.conns.Add(1)
	from := c.RemoteAddr().String()
	fail := func(err error) {
		f.log.emit(tunnelEvent{Event: "close", Peer: f.target.String(), Local: from, Conn: id, Error: err.Error()}, "#%d from %s failed: %v", id, from, err)
	}
	st, err := sess.OpenStream(ctx)
	if err != nil {
		fail(err)
		return
	}
	st.SetReadDeadline(time.Now().Add(f.timeout))
	if _, err := st.Write([]byte(tunnelProto + " connect\n")); err != nil {
		st.Reset()
		fail(err)
		return
	}
	br := bufio.NewReader(st)
	line, err := readLine(br, maxTunnelLine)
	if err == nil {
		err = parseTunnelReply(line)
	}
	if err != nil {
		st.Reset()
		fail(err)
		return
	}
	st.SetReadDeadline(time.Time{})
	f.log.emit(tunnelEvent{Event: "open", Peer: f.target.String(), Local: from, Conn: id}, "#%d from %s to %s", id, from, f.target.Short())
	received, sent, err := pipe(st, br, c)
	ev := tunnelEvent{Event: "close", Peer: f.target.String(), Local: from, Conn: id, Sent: &sent, Received: &received}
	if err != nil {
		ev.Error = err.Error()
	}
	f.log.emit(ev, "#%d from %s closed: %s out, %s in%s", id, from, formatBytes(sent), formatBytes(received), errSuffix(err))
}
