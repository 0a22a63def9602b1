package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/session"
)

// File transfer wire format, on one stream:
//
//	sender:   header line (JSON fileHeader)
//	receiver: reply line (JSON transferReply): go ahead, or why not
//	sender:   Size bytes of data, then their SHA-256 (32 bytes), then end of stream
//	receiver: reply line: the verdict after checking the SHA-256, then end of stream
//
// The go-ahead comes before the data so that a refusal costs no transfer; the verdict
// comes after the file is on disk so that the sender's success means the receiver has
// the file.
const (
	transferVersion = 1
	maxHeaderLine   = 4 << 10
	maxReplyLine    = 4 << 10
	maxFileSize     = 1 << 50
	// maxNameLen is the longest file name most file systems take (NAME_MAX).
	maxNameLen = 255
	// transferLinger is how long the receiver waits, after its verdict, for the sender
	// to close the session, so that the verdict arrives.
	transferLinger = 5 * time.Second
	// verdictWait bounds the sender's wait for the verdict once the data is sent: the
	// receiver flushes the file to disk first.
	verdictWait = 2 * time.Minute
)

var (
	// errBadHeader: the sender's header is not one this version understands.
	errBadHeader = errors.New("bad file header")
	// errChecksum: the data received does not hash to what the sender's file does.
	errChecksum = errors.New("checksum mismatch")
	// errExists: the file is already in the receiver's directory and --force is off.
	errExists = errors.New("file already exists")
	// errShort: the stream ended before the data and its checksum had all arrived.
	errShort = errors.New("transfer cut short")
	// errRefused: the receiver did not take the file.
	errRefused = errors.New("refused by the receiver")
)

// fileHeader announces a file.
type fileHeader struct {
	V    int    `json:"v"`
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// transferReply is the receiver's answer to a header (go ahead or not) and to the
// data (its verdict).
type transferReply struct {
	OK bool `json:"ok"`
	// Kind names the failure for programs: not_accepted, busy, exists, bad_header,
	// checksum, short, failed.
	Kind   string `json:"kind,omitempty"`
	Error  string `json:"error,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
}

// parseFileHeader decodes a header line; the name it returns is safe to create in the
// receiver's directory (see sanitizeName).
func parseFileHeader(line []byte) (fileHeader, error) {
	var h fileHeader
	if err := json.Unmarshal(line, &h); err != nil {
		return fileHeader{}, fmt.Errorf("%w: %v", errBadHeader, err)
	}
	if h.V != transferVersion {
		return fileHeader{}, fmt.Errorf("%w: version %d; this peerlink speaks version %d (update the older end)", errBadHeader, h.V, transferVersion)
	}
	if h.Size < 0 || h.Size > maxFileSize {
		return fileHeader{}, fmt.Errorf("%w: size %d out of range", errBadHeader, h.Size)
	}
	name, err := sanitizeName(h.Name)
	if err != nil {
		return fileHeader{}, fmt.Errorf("%w: %v", errBadHeader, err)
	}
	h.Name = name
	return h, nil
}

// sanitizeName turns the name a sender gave into one that names a file directly in the
// receiver's directory: its last path element (whichever separator the sender's system
// uses), with control and bidirectional-override characters (which could disguise the
// name in a listing) replaced by '_'. Names that remain empty, "." or ".." or are too
// long are refused.
func sanitizeName(name string) (string, error) {
	if i := strings.LastIndexAny(name, `/\`); i >= 0 {
		name = name[i+1:]
	}
	name = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) || r == unicode.ReplacementChar {
			return '_'
		}
		return r
	}, name)
	switch {
	case name == "" || name == "." || name == "..":
		return "", fmt.Errorf("file name %q names no file", name)
	case len(name) > maxNameLen:
		return "", fmt.Errorf("file name of %d bytes: at most %d", len(name), maxNameLen)
	}
	return name, nil
}

func readReply(br *bufio.Reader) (transferReply, error) {
	line, err := readLine(br, maxReplyLine)
	if err != nil {
		return transferReply{}, err
	}
	var r transferReply
	if err := json.Unmarshal(line, &r); err != nil {
		return transferReply{}, fmt.Errorf("the receiver's reply is not peerlink's: %w", err)
	}
	return r, nil
}

// sendData writes size bytes of f, then their SHA-256, to w.
func sendData(w io.Writer, f io.Reader, size int64, count io.Writer) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	hash := sha256.New()
	n, err := io.CopyN(io.MultiWriter(w, hash, count), f, size)
	switch {
	case errors.Is(err, io.EOF):
		return sum, fmt.Errorf("the file shrank while being sent: %d of %d bytes", n, size)
	case err != nil:
		return sum, err
	}
	hash.Sum(sum[:0])
	_, err = w.Write(sum[:])
	return sum, err
}

// receiveInto reads the file h announces from r (h.Size bytes, then their SHA-256) into
// root: under a temporary name, renamed to h.Name only once the checksum matches. On
// any failure nothing is left behind. Without force it never replaces an existing file.
// count sees the data as it arrives.
func receiveInto(root *os.Root, h fileHeader, r io.Reader, force bool, count io.Writer) (sum [sha256.Size]byte, err error) {
	if !force {
		if err := checkFree(root, h.Name); err != nil {
			return sum, err
		}
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := ".peerlink-" + hex.EncodeToString(rnd[:]) + ".part"
	f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o666)
	if err != nil {
		return sum, fmt.Errorf("creating a file in %s: %w", root.Name(), err)
	}
	closed := false
	defer func() {
		if !closed {
			f.Close()
		}
		if err != nil {
			root.Remove(tmp)
		}
	}()
	hash := sha256.New()
	w := io.MultiWriter(f, hash)
	if count != nil {
		w = io.MultiWriter(f, hash, count)
	}
	n, err := io.CopyN(w, r, h.Size)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return sum, fmt.Errorf("%w: %d of %d bytes arrived", errShort, n, h.Size)
		}
		return sum, fmt.Errorf("%w after %d of %d bytes: %w", errShort, n, h.Size, err)
	}
	var want [sha256.Size]byte
	if _, err := io.ReadFull(r, want[:]); err != nil {
		return sum, fmt.Errorf("%w: the data arrived but not its checksum (%v)", errShort, err)
	}
	hash.Sum(sum[:0])
	if sum != want {
		return sum, fmt.Errorf("%w: the data received hashes to %x, the sender's file to %x", errChecksum, sum, want)
	}
	if err = f.Sync(); err == nil {
		closed, err = true, f.Close()
	}
	if err != nil {
		return sum, fmt.Errorf("writing %s: %w", h.Name, err)
	}
	if force {
		return sum, root.Rename(tmp, h.Name)
	}
	// A hard link fails when the name exists, so a file that appeared during the
	// transfer is not replaced; file systems without hard links get a check instead.
	switch err = root.Link(tmp, h.Name); {
	case err == nil:
		root.Remove(tmp)
		return sum, nil
	case errors.Is(err, fs.ErrExist):
		return sum, fmt.Errorf("%w: %s appeared in %s during the transfer", errExists, h.Name, root.Name())
	}
	if err = checkFree(root, h.Name); err != nil {
		return sum, err
	}
	return sum, root.Rename(tmp, h.Name)
}

func checkFree(root *os.Root, name string) error {
	_, err := root.Lstat(name)
	switch {
	case err == nil:
		return fmt.Errorf("%w: %s is already in %s", errExists, name, root.Name())
	case errors.Is(err, fs.ErrNotExist):
		return nil
	}
	return err
}

// replyKind names err for transferReply.Kind.
func replyKind(err error) string {
	switch {
	case errors.Is(err, errChecksum):
		return "checksum"
	case errors.Is(err, errExists):
		return "exists"
	case errors.Is(err, errShort):
		return "short"
	case errors.Is(err, errBadHeader):
		return "bad_header"
	}
	return "failed"
}

// transferJSON is send's and receive's --json output.
type transferJSON struct {
	File    string  `json:"file"`
	Bytes   int64   `json:"bytes"`
	SHA256  string  `json:"sha256,omitempty"`
	Seconds float64 `json:"seconds"`
	Rate    float64 `json:"rate"` // bytes per second
	Method  string  `json:"method,omitempty"`
	Peer    string  `json:"peer,omitempty"`
	Error   string  `json:"error,omitempty"`
}

func (t *transferJSON) timed(d time.Duration) {
	t.Seconds = d.Seconds()
	if t.Seconds > 0 {
		t.Rate = float64(t.Bytes) / t.Seconds
	}
}

func runSend(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink send", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	timeout := fs.Duration("timeout", 10*time.Second, "give up connecting, or waiting for the receiver's answer, after this long")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink send [--server URL] [--identity FILE] [--stun HOST:PORT ...] [--relay HOST:PORT] [--json] <node> FILE

Sends FILE to <node>, which runs 'peerlink receive', over an encrypted stream: its name
and size first (the receiver may refuse), then the data and its SHA-256, which the
receiver checks before it keeps the file. Progress (bytes, rate, time left) goes to
stderr; the result to stdout. Success means the receiver has the file, checked, on disk.

Exit status: 0 the receiver has the file, 1 failure (refused, checksum mismatch, lost
connection: the message says which and what to do), 2 bad usage.

Examples:
  peerlink receive --dir ~/Downloads                 # on one machine; prints its NodeID
  peerlink send pl4bq... report.pdf                  # on the other
  peerlink send --json pl4bq... disk.img | jq .rate

Flags:
`)
		fs.PrintDefaults()
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return fmt.Errorf("%w: want <node> FILE, got %d arguments", errUsage, len(pos))
	}
	target, err := identity.ParseNodeID(pos[0])
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *timeout <= 0 {
		return fmt.Errorf("%w: --timeout must be positive", errUsage)
	}
	path := pos[1]
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cannot read the file to send: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("cannot read the file to send: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: %s is not a regular file: send one file (for a directory: tar c DIR | peerlink cat <node>)", errUsage, path)
	}
	name, err := sanitizeName(filepath.Base(path))
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if err := nf.resolve(); err != nil {
		return err
	}
	out := transferJSON{File: path, Bytes: fi.Size(), Peer: target.String()}
	err = sendFile(ctx, &nf, target, f, fileHeader{V: transferVersion, Name: name, Size: fi.Size()}, *timeout, stderr, &out)
	if err != nil {
		out.Error = err.Error()
	}
	if nf.json {
		writeJSONLine(stdout, out)
	} else if err == nil {
		fmt.Fprintf(stdout, "sent %s (%s) to %s in %.1fs, %s/s, %s; sha256 %s\n",
			name, formatBytes(out.Bytes), target.Short(), out.Seconds, formatBytes(int64(out.Rate)), out.Method, out.SHA256)
	}
	return err
}

// sendFile connects to target and sends f, which h announces, filling out.
func sendFile(ctx context.Context, nf *nodeFlags, target identity.NodeID, f io.Reader, h fileHeader, timeout time.Duration, stderr io.Writer, out *transferJSON) error {
	p, err := startClient(ctx, nf, stderr)
	if err != nil {
		return err
	}
	defer p.Close()
	sess, err := p.dial(ctx, target, timeout, "peerlink receive")
	if err != nil {
		return err
	}
	defer sess.Close()
	st, err := sess.OpenStream(ctx)
	if err != nil {
		return fmt.Errorf("stream to %s: %w", target.Short(), err)
	}
	// Ctrl-C ends the transfer at once; the receiver discards what it got.
	defer context.AfterFunc(ctx, st.Reset)()
	if err := writeJSONLine(st, h); err != nil {
		return fmt.Errorf("sending to %s: %w", target.Short(), err)
	}
	br := bufio.NewReader(st)
	st.SetReadDeadline(time.Now().Add(timeout))
	ok, err := readReply(br)
	if err != nil {
		return fmt.Errorf("no answer from %s within %v (is it running 'peerlink receive'?): %w", target.Short(), timeout, err)
	}
	if !ok.OK {
		return fmt.Errorf("%w: %s", errRefused, ok.Error)
	}
	fmt.Fprintf(stderr, "peerlink send: %s accepted %s (%s, %s)\n", target.Short(), h.Name, formatBytes(h.Size), sess.Method())

	start := time.Now()
	prog := startProgress(stderr, "sending "+h.Name, h.Size)
	sum, err := sendData(st, f, h.Size, prog)
	prog.Stop()
	if err != nil {
		st.Reset()
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("interrupted: %s was not sent", h.Name)
		case peerReset(err) || peerClosed(err):
			return fmt.Errorf("sending %s: %s stopped receiving it, and keeps nothing (was it interrupted?): %w", h.Name, target.Short(), err)
		}
		return fmt.Errorf("sending %s: %w", h.Name, err)
	}
	st.Close()
	st.SetReadDeadline(time.Now().Add(verdictWait))
	verdict, err := readReply(br)
	if err != nil {
		return fmt.Errorf("%s has all the data but gave no verdict on it: %w (the file may not have been kept)", target.Short(), err)
	}
	out.SHA256 = hex.EncodeToString(sum[:])
	out.Method = sess.Method().String()
	out.timed(time.Since(start))
	if !verdict.OK {
		if verdict.Kind == "checksum" {
			return fmt.Errorf("%w: %s discarded %s: %s; send it again", errChecksum, target.Short(), h.Name, verdict.Error)
		}
		return fmt.Errorf("%s did not keep %s: %s", target.Short(), h.Name, verdict.Error)
	}
	if verdict.SHA256 != out.SHA256 {
		return fmt.Errorf("%w: %s kept %s with SHA-256 %s, but it is %s here", errChecksum, target.Short(), h.Name, verdict.SHA256, out.SHA256)
	}
	return nil
}

func runReceive(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink receive", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	dir := fs.String("dir", ".", "save files in this directory (it must exist)")
	var accept stringList
	fs.Var(&accept, "accept", "take files only from this node (repeatable or comma separated; default: from any node)")
	force := fs.Bool("force", false, "replace a file of the same name in --dir (default: refuse the transfer)")
	keep := fs.Bool("keep", false, "keep receiving after the first transfer, until interrupted")
	timeout := fs.Duration("timeout", 10*time.Second, "give up on a sender that does not finish its handshake or header within this long")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink receive [--dir DIR] [--accept NODE ...] [--force] [--keep] [node flags] [--json]

Waits for a node running 'peerlink send' and saves the file it sends in DIR. The file is
written under a temporary name and renamed when its SHA-256 matches the sender's; on a
mismatch or a cut-off transfer nothing is kept. Only the last element of the sender's
name is used, so nothing lands outside DIR, and an existing file is never replaced
without --force. Progress goes to stderr, the result to stdout. Without --keep it exits
after the first transfer from an accepted node.

Exit status: 0 the file was received and checked, 1 failure (checksum mismatch, file
exists, lost connection: the message says which), 2 bad usage. With --keep: 0 after
Ctrl-C or SIGTERM.

Examples:
  peerlink receive                                   # prints its NodeID; saves here
  peerlink receive --dir ~/Downloads --accept pl4bq...
  peerlink receive --keep --json --dir /srv/inbox

Flags:
`)
		fs.PrintDefaults()
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return fmt.Errorf("%w: unexpected argument %q (the directory goes after --dir)", errUsage, pos[0])
	}
	if *timeout <= 0 {
		return fmt.Errorf("%w: --timeout must be positive", errUsage)
	}
	allowed, err := parseNodeList(accept, "--accept")
	if err != nil {
		return err
	}
	root, err := os.OpenRoot(*dir)
	if err != nil {
		return fmt.Errorf("cannot save files in --dir %s: %w (create it first, or pass another)", *dir, err)
	}
	defer root.Close()
	if err := nf.resolve(); err != nil {
		return err
	}
	p, err := startClient(ctx, &nf, stderr)
	if err != nil {
		return err
	}
	defer p.Close()
	r := &receiver{p: p, root: root, allowed: allowed, force: *force, keep: *keep, json: nf.json,
		timeout: *timeout, stdout: stdout, stderr: stderr, result: make(chan error, 1)}
	return r.run(ctx)
}

// parseNodeList parses NodeIDs given in a repeatable, comma-separated flag. An empty
// list gives a nil set.
func parseNodeList(list []string, flagName string) (map[identity.NodeID]bool, error) {
	var set map[identity.NodeID]bool
	for _, v := range list {
		for s := range strings.SplitSeq(v, ",") {
			if s = strings.TrimSpace(s); s == "" {
				continue
			}
			id, err := identity.ParseNodeID(s)
			if err != nil {
				return nil, fmt.Errorf("%w: %s %q: %v", errUsage, flagName, s, err)
			}
			if set == nil {
				set = map[identity.NodeID]bool{}
			}
			set[id] = true
		}
	}
	return set, nil
}

// receiver is one run of peerlink receive.
type receiver struct {
	p       *clientNode
	root    *os.Root
	allowed map[identity.NodeID]bool // nil: any node
	force   bool
	keep    bool
	json    bool
	timeout time.Duration
	stderr  io.Writer
	// claimed is set by the first transfer without --keep, which then sends its outcome
	// on result.
	claimed atomic.Bool
	result  chan error

	mu     sync.Mutex // serialises results on stdout
	stdout io.Writer
}

func (r *receiver) run(ctx context.Context) error {
	who := "any node"
	if r.allowed != nil {
		who = fmt.Sprintf("%d accepted node(s)", len(r.allowed))
	}
	fmt.Fprintf(r.stderr, "peerlink receive: listening as %s; saving files from %s in %s\n", r.p.id.NodeID(), who, r.root.Name())
	hctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	wg.Go(func() {
		for {
			conn, err := r.p.node.Accept(hctx)
			if err != nil {
				return
			}
			wg.Go(func() { r.handle(hctx, conn) })
		}
	})
	select {
	case <-ctx.Done():
		if r.keep {
			return nil
		}
		if r.claimed.Load() {
			return <-r.result // the transfer, cut off, says what was lost
		}
		return errors.New("interrupted before a file arrived")
	case err := <-r.result:
		return err
	}
}

// handle serves one sender.
func (r *receiver) handle(ctx context.Context, conn *connect.Conn) {
	sess, err := r.p.secure(ctx, conn, r.timeout)
	if err != nil {
		fmt.Fprintf(r.stderr, "peerlink receive: %v\n", err)
		return
	}
	defer sess.Close()
	peer := sess.Peer()
	actx, cancel := context.WithTimeout(ctx, r.timeout)
	st, err := sess.AcceptStream(actx)
	cancel()
	if err != nil {
		fmt.Fprintf(r.stderr, "peerlink receive: %s connected but sent nothing within %v: %v\n", peer.Short(), r.timeout, err)
		return
	}
	defer context.AfterFunc(ctx, st.Reset)()
	br := bufio.NewReader(st)
	st.SetReadDeadline(time.Now().Add(r.timeout))
	line, err := readLine(br, maxHeaderLine)
	var h fileHeader
	if err == nil {
		h, err = parseFileHeader(line)
	}
	if err != nil {
		fmt.Fprintf(r.stderr, "peerlink receive: %s sent no usable file header: %v\n", peer.Short(), err)
		r.refuse(ctx, sess, st, transferReply{Kind: "bad_header", Error: err.Error()})
		return
	}
	st.SetReadDeadline(time.Time{})
	if r.allowed != nil && !r.allowed[peer] {
		fmt.Fprintf(r.stderr, "peerlink receive: refused %s from %s: not an --accept node\n", h.Name, peer)
		r.refuse(ctx, sess, st, transferReply{Kind: "not_accepted", Error: fmt.Sprintf("this receiver does not take files from %s (its owner can add --accept %s)", peer, peer)})
		return
	}
	if !r.keep && !r.claimed.CompareAndSwap(false, true) {
		r.refuse(ctx, sess, st, transferReply{Kind: "busy", Error: "the receiver is busy with another transfer; try again when it has finished"})
		return
	}
	err = r.receive(ctx, sess, st, br, h)
	switch {
	case !r.keep:
		r.result <- err // reported as the command's outcome
	case err != nil:
		fmt.Fprintf(r.stderr, "peerlink receive: %v\n", err)
	}
}

// receive takes one announced file and reports it.
func (r *receiver) receive(ctx context.Context, sess *session.Session, st *session.Stream, br *bufio.Reader, h fileHeader) error {
	peer := sess.Peer()
	out := transferJSON{File: filepath.Join(r.root.Name(), h.Name), Peer: peer.String()}
	err := r.take(ctx, sess, st, br, h, &out)
	if err != nil {
		out.Error = err.Error()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.json {
		writeJSONLine(r.stdout, out)
	} else if err == nil {
		fmt.Fprintf(r.stdout, "received %s (%s) from %s in %.1fs, %s/s, %s; sha256 %s\n",
			out.File, formatBytes(out.Bytes), peer.Short(), out.Seconds, formatBytes(int64(out.Rate)), out.Method, out.SHA256)
	}
	return err
}

func (r *receiver) take(ctx context.Context, sess *session.Session, st *session.Stream, br *bufio.Reader, h fileHeader, out *transferJSON) error {
	peer := sess.Peer()
	if !r.force {
		if err := checkFree(r.root, h.Name); err != nil {
			r.refuse(ctx, sess, st, transferReply{Kind: "exists", Error: fmt.Sprintf("%s already has a file named %s (it can pass --force to replace it; or rename yours)", peer.Short(), h.Name)})
			return fmt.Errorf("refused %s from %s: %w (pass --force to replace it)", h.Name, peer.Short(), err)
		}
	}
	if err := writeJSONLine(st, transferReply{OK: true}); err != nil {
		return fmt.Errorf("answering %s: %w", peer.Short(), err)
	}
	fmt.Fprintf(r.stderr, "peerlink receive: %s from %s (%s, %s)\n", h.Name, peer.Short(), formatBytes(h.Size), sess.Method())
	start := time.Now()
	prog := startProgress(r.stderr, "receiving "+h.Name, h.Size)
	sum, err := receiveInto(r.root, h, br, r.force, prog)
	prog.Stop()
	out.Bytes = h.Size
	out.Method = sess.Method().String()
	out.timed(time.Since(start))
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("interrupted: %w", err)
		}
		r.refuse(ctx, sess, st, transferReply{Kind: replyKind(err), Error: err.Error()})
		switch {
		case errors.Is(err, errChecksum):
			return fmt.Errorf("discarded %s from %s: %w", h.Name, peer.Short(), err)
		case ctx.Err() == nil && (peerReset(err) || peerClosed(err)):
			return fmt.Errorf("receiving %s from %s (nothing kept): the sender stopped (was it interrupted?): %w", h.Name, peer.Short(), err)
		}
		return fmt.Errorf("receiving %s from %s (nothing kept): %w", h.Name, peer.Short(), err)
	}
	out.SHA256 = hex.EncodeToString(sum[:])
	writeJSONLine(st, transferReply{OK: true, SHA256: out.SHA256})
	finish(ctx, sess, st)
	return nil
}

// refuse answers the sender with a failure and ends the transfer.
func (r *receiver) refuse(ctx context.Context, sess *session.Session, st *session.Stream, reply transferReply) {
	writeJSONLine(st, reply)
	finish(ctx, sess, st)
}

// finish ends this side of the stream and waits a moment for the sender, which has the
// last word, to close the session: closing it first could lose the reply.
func finish(ctx context.Context, sess *session.Session, st *session.Stream) {
	st.Close()
	st.CloseRead() // whatever the sender still sends is not wanted
	select {
	case <-sess.Done():
	case <-time.After(transferLinger):
	case <-ctx.Done():
	}
}

// progress shows a transfer's progress on a terminal (redrawn in place) or, when
// stderr is a file or pipe, as a line now and then. It counts what is written to it.
type progress struct {
	w     io.Writer
	label string
	total int64
	tty   bool
	start time.Time
	n     atomic.Int64

	once sync.Once
	stop chan struct{}
	done chan struct{}
}

func startProgress(w io.Writer, label string, total int64) *progress {
	p := &progress{w: w, label: label, total: total, tty: isTerminal(w), start: time.Now(),
		stop: make(chan struct{}), done: make(chan struct{})}
	interval := 2 * time.Second
	if p.tty {
		interval = 200 * time.Millisecond
	}
	go func() {
		defer close(p.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.draw(false)
			}
		}
	}()
	return p
}

func (p *progress) Write(b []byte) (int, error) {
	p.n.Add(int64(len(b)))
	return len(b), nil
}

// Stop ends the display with a last line. It is idempotent and waits.
func (p *progress) Stop() {
	p.once.Do(func() {
		close(p.stop)
		<-p.done
		p.draw(true)
	})
}

func (p *progress) draw(last bool) {
	line := renderProgress(p.label, p.n.Load(), p.total, time.Since(p.start), p.tty)
	switch {
	case !p.tty:
		fmt.Fprintln(p.w, line)
	case last:
		fmt.Fprintf(p.w, "\r%s\x1b[K\n", line)
	default:
		fmt.Fprintf(p.w, "\r%s\x1b[K", line)
	}
}

// renderProgress is one progress line: bar (on a terminal), share, bytes, rate and
// the time left at that rate.
func renderProgress(label string, done, total int64, elapsed time.Duration, bar bool) string {
	frac := 1.0
	if total > 0 {
		frac = min(float64(done)/float64(total), 1)
	}
	var b strings.Builder
	b.WriteString(label)
	if bar {
		const width = 20
		full := int(frac * width)
		b.WriteString(" [" + strings.Repeat("#", full) + strings.Repeat(".", width-full) + "]")
	}
	fmt.Fprintf(&b, " %3d%% %s / %s", int(frac*100), formatBytes(done), formatBytes(total))
	var rate float64
	if s := elapsed.Seconds(); s > 0 {
		rate = float64(done) / s
	}
	fmt.Fprintf(&b, " %s/s", formatBytes(int64(rate)))
	switch {
	case done >= total:
		fmt.Fprintf(&b, " in %v", elapsed.Round(100*time.Millisecond))
	case rate > 0:
		fmt.Fprintf(&b, " ETA %s", formatDuration(time.Duration(float64(total-done)/rate*float64(time.Second))))
	default:
		b.WriteString(" ETA --:--")
	}
	return b.String()
}

// formatBytes is n in binary units, one decimal from KiB on.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n)/unit, 0
	for v >= unit && i < 4 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTP"[i])
}

// formatDuration is d as m:ss, or h:mm:ss from an hour on, rounded up to the second.
func formatDuration(d time.Duration) string {
	s := int64((d + time.Second - 1) / time.Second)
	if s >= 3600 {
		return fmt.Sprintf("%d:%02d:%02d", s/3600, s/60%60, s%60)
	}
	return fmt.Sprintf("%d:%02d", s/60, s%60)
}

// isTerminal reports whether w is a terminal (character device), where progress is
// redrawn in place.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0 && !isDevNull(fi)
}

// isDevNull: /dev/null is a character device too, but nobody watches it.
func isDevNull(fi os.FileInfo) bool {
	null, err := os.Stat(os.DevNull)
	return err == nil && os.SameFile(fi, null)
}
