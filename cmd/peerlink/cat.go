package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/session"
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
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	var target identity.NodeID
	switch {
	case *listen && len(pos) != 0:
		return fmt.Errorf("%w: --listen takes no <node>", errUsage)
	case !*listen && len(pos) != 1:
		return fmt.Errorf("%w: want exactly one <node> (or --listen), got %d arguments", errUsage, len(pos))
	case !*listen:
		if target, err = identity.ParseNodeID(pos[0]); err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
	}
	if *timeout <= 0 {
		return fmt.Errorf("%w: --timeout must be positive", errUsage)
	}
	if err := nf.resolve(); err != nil {
		return err
	}
	id, err := nf.loadIdentity()
	if err != nil {
		return err
	}
	log := nf.logger(stderr)
	sig, err := nf.dial(ctx, id, log)
	if err != nil {
		return err
	}
	if sig != nil {
		defer sig.Close()
	}
	node, err := nf.startNode(ctx, id, sig, log)
	if err != nil {
		return err
	}
	defer node.Close()

	var conn *connect.Conn
	if *listen {
		fmt.Fprintf(stderr, "peerlink cat: listening as %s\n", id.NodeID())
		if conn, err = node.Accept(ctx); err != nil {
			return fmt.Errorf("accepting: %w", err)
		}
	} else {
		cctx, cancel := context.WithTimeout(ctx, *timeout)
		conn, err = node.Connect(cctx, target, connect.Options{Timeout: *timeout})
		cancel()
		if err != nil {
			return fmt.Errorf("connecting to %s: %w", target.Short(), err)
		}
	}
	sctx, cancel := context.WithTimeout(ctx, *timeout)
	sess, err := session.New(sctx, conn, session.Config{Identity: id, Logger: log})
	cancel()
	if err != nil {
		return fmt.Errorf("encrypted session with %s: %w", conn.Peer().Short(), err)
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
