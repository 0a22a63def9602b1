package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/session"
	"peerlink/signal"
)

// catStdin is what peerlink cat sends; a variable so tests in this process could swap
// it (the exec tests use the real stdin).
var catStdin io.Reader = os.Stdin

func runCat(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink cat", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	listen := fs.Bool("listen", false, "wait for one node to connect instead of connecting")
	timeout := fs.Duration("timeout", 10*time.Second, "give up connecting after this long")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink cat [--server URL] [--identity FILE] [--stun HOST:PORT ...] [--relay HOST:PORT] <node>
       peerlink cat --listen [node flags]

netcat across NATs: connects to <node> (or, with --listen, waits for one node to connect),
opens an encrypted stream to it, and copies stdin to the stream and the stream to stdout
until both ends have finished. The peer's identity is checked against its NodeID. Progress
and the connection's method go to stderr, so stdout carries only the data.

Exit status: 0 when both directions finished, 1 on failure, 2 bad usage.

Examples:
  peerlink cat --listen > received.tar          # on one machine; prints its NodeID
  tar c dir | peerlink cat pl4bq...             # on the other
  peerlink cat pl4bq... < request.txt

Flags:
`)
		fs.PrintDefaults()
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	target, err := listenOrNode(pos, *listen)
	if err != nil {
		return err
	}
	if *timeout <= 0 {
		return fmt.Errorf("%w: --timeout must be positive", errUsage)
	}
	if err := nf.resolve(); err != nil {
		return err
	}
	p, err := startClient(ctx, &nf, stderr)
	if err != nil {
		return err
	}
	defer p.Close()
	var sess *session.Session
	if *listen {
		fmt.Fprintf(stderr, "peerlink cat: listening as %s\n", p.id.NodeID())
		conn, err := p.node.Accept(ctx)
		if err != nil {
			return fmt.Errorf("accepting: %w", err)
		}
		if sess, err = p.secure(ctx, conn, *timeout); err != nil {
			return err
		}
	} else if sess, err = p.dial(ctx, target, *timeout, "peerlink cat --listen"); err != nil {
		return err
	}
	defer sess.Close()
	var st *session.Stream
	if *listen {
		st, err = sess.AcceptStream(ctx)
	} else {
		st, err = sess.OpenStream(ctx)
	}
	if err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	fmt.Fprintf(stderr, "peerlink cat: connected to %s (%s)\n", sess.Peer(), sess.Method())

	// Both directions run until their end: stdin's EOF closes the stream for writing
	// (the peer reads EOF), and the peer's close ends the copy to stdout.
	var wg sync.WaitGroup
	var sendErr error
	wg.Go(func() {
		if _, err := io.Copy(st, catStdin); err != nil {
			sendErr = fmt.Errorf("sending: %w", err)
		}
		st.Close()
	})
	_, recvErr := io.Copy(stdout, st)
	if recvErr != nil {
		recvErr = fmt.Errorf("receiving: %w", recvErr)
		st.Reset()
	}
	wg.Wait()
	if err := errors.Join(recvErr, sendErr); err != nil {
		return err
	}
	// Closing the session at once could cut off what the peer has yet to read. So each
	// side says, on a stream of its own, that it has read everything, and closes once it
	// has heard the same (or after a while: its own data was all sent by then).
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if ack, err := sess.OpenStream(actx); err == nil {
		ack.Write([]byte{1})
		ack.Close()
	}
	if ack, err := sess.AcceptStream(actx); err == nil {
		ack.Read(make([]byte, 1))
	}
	return nil
}

// clientNode is the node a client command (cat, chat, send, receive, tunnel) runs on,
// with its identity and rendezvous connection.
type clientNode struct {
	nf   *nodeFlags
	id   *identity.Identity
	sig  *signal.Client // nil on the local network only
	node *connect.Node
	log  *slog.Logger
}

// startClient loads the identity, reaches the rendezvous server and starts a node. nf
// must have been resolved.
func startClient(ctx context.Context, nf *nodeFlags, stderr io.Writer) (*clientNode, error) {
	id, err := nf.loadIdentity()
	if err != nil {
		return nil, err
	}
	log := nf.logger(stderr)
	sig, err := nf.dial(ctx, id, log)
	if err != nil {
		return nil, err
	}
	node, err := nf.startNode(ctx, id, sig, log)
	if err != nil {
		if sig != nil {
			sig.Close()
		}
		return nil, err
	}
	return &clientNode{nf: nf, id: id, sig: sig, node: node, log: log}, nil
}

// Close stops the node, which says goodbye to its peers, then leaves the rendezvous
// server.
func (p *clientNode) Close() {
	p.node.Close()
	if p.sig != nil {
		p.sig.Close()
	}
}

// dial connects to target and starts an encrypted session with it. other is what target
// has to run (say "peerlink receive"), for the advice in errors.
func (p *clientNode) dial(ctx context.Context, target identity.NodeID, timeout time.Duration, other string) (*session.Session, error) {
	if target == p.id.NodeID() {
		return nil, fmt.Errorf("%w: %s is this node's own NodeID (use another --identity for one of the two ends)", errUsage, target.Short())
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	conn, err := p.node.Connect(cctx, target, connect.Options{Timeout: timeout})
	cancel()
	switch {
	case err == nil:
	case errors.Is(err, connect.ErrPeerOffline):
		return nil, fmt.Errorf("peer %s is not connected to the rendezvous server %s: run '%s' on it first, with the same --server: %w", target, p.nf.server, other, err)
	case errors.Is(err, connect.ErrNoRelay) && (p.nf.relay == "" || p.nf.relay == "none"):
		return nil, fmt.Errorf("no direct path to %s and no relay to fall back on: pass --relay HOST:PORT or set PEERLINK_RELAY (run 'peerlink relay' for one): %w", target.Short(), err)
	case errors.Is(err, connect.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return nil, fmt.Errorf("no path to %s within %v: it may not be reachable over UDP; pass --relay HOST:PORT, or a longer --timeout: %w", target.Short(), timeout, err)
	default:
		return nil, fmt.Errorf("connecting to %s: %w", target.Short(), err)
	}
	return p.secure(ctx, conn, timeout)
}

// secure starts the encrypted session on conn, which it owns from then on.
func (p *clientNode) secure(ctx context.Context, conn *connect.Conn, timeout time.Duration) (*session.Session, error) {
	sctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	sess, err := session.New(sctx, conn, session.Config{Identity: p.id, Logger: p.log})
	if err != nil {
		return nil, fmt.Errorf("encrypted session with %s: %w", conn.Peer().Short(), err)
	}
	return sess, nil
}

// errLineTooLong: a peer sent a line longer than its protocol allows.
var errLineTooLong = errors.New("line too long")

// readLine reads one '\n'-terminated line of at most max bytes (the newline excluded)
// from r, so a peer cannot make this side buffer without bound. A last line without a
// newline is returned with io.ErrUnexpectedEOF.
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(line)+len(chunk) > max+1 {
			return nil, fmt.Errorf("%w: over %d bytes", errLineTooLong, max)
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return line, io.ErrUnexpectedEOF
		}
		return nil, err
	}
}

// writeJSONLine writes v as one line of JSON.
func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// clockTime is a time of day for people, as chat and tunnel lines start with.
func clockTime(t time.Time) string { return t.Format("15:04:05") }

// peerClosed reports whether a session ended because the peer closed it, as it does
// when it finishes or is stopped, rather than by a failure.
func peerClosed(err error) bool {
	var ae *quic.ApplicationError
	return errors.As(err, &ae) && ae.Remote && ae.ErrorCode == 0
}

// peerReset reports whether the peer abandoned a stream (it was stopped, or gave up).
func peerReset(err error) bool {
	var se *quic.StreamError
	return errors.As(err, &se) && se.Remote
}

// listenOrNode checks the positional arguments of a command that either waits for a
// node (--listen) or connects to one <node>, and returns that node (zero with --listen).
func listenOrNode(pos []string, listen bool) (identity.NodeID, error) {
	switch {
	case listen && len(pos) != 0:
		return identity.NodeID{}, fmt.Errorf("%w: --listen takes no <node>", errUsage)
	case listen:
		return identity.NodeID{}, nil
	case len(pos) != 1:
		return identity.NodeID{}, fmt.Errorf("%w: want exactly one <node> (a NodeID, as 'peerlink id' prints it) or --listen, got %d arguments", errUsage, len(pos))
	}
	target, err := identity.ParseNodeID(pos[0])
	if err != nil {
		return identity.NodeID{}, fmt.Errorf("%w: %v", errUsage, err)
	}
	return target, nil
}
