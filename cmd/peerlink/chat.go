package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
	"unicode"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/session"
)

// chatStdin is what peerlink chat reads messages from; a variable like catStdin.
var chatStdin io.Reader = os.Stdin

// Chat wire format: one stream, each way a sequence of JSON lines (chatFrame). Each
// side's first frame is a hello; the opener's is also what makes the stream (opened
// lazily by QUIC) appear at the listener. A listener already in a chat answers with
// busy instead, and ends the stream.
const (
	chatHello   = "hello"
	chatMessage = "chat_message"
	chatBusy    = "busy"
	// maxChatText bounds one message's text, maxChatLine its frame: JSON may escape
	// every byte of the text as six.
	maxChatText = 8 << 10
	maxChatLine = 6*maxChatText + 256
	// chatLinger is how long a side that has finished waits for the peer to finish
	// too, so that neither cuts off what the other has yet to read.
	chatLinger = 3 * time.Second
)

type chatFrame struct {
	Type string    `json:"type"`
	Text string    `json:"text,omitempty"`
	Time time.Time `json:"time"`
}

// errChatFrame: the peer sent something that is not a chat frame.
var errChatFrame = errors.New("not a chat frame")

// errChatUnknown: a frame of a kind this version does not know, which it skips.
var errChatUnknown = errors.New("unknown chat frame")

// parseChatFrame decodes one line of the chat stream.
func parseChatFrame(line []byte) (chatFrame, error) {
	var f chatFrame
	if err := json.Unmarshal(line, &f); err != nil {
		return chatFrame{}, fmt.Errorf("%w: %v", errChatFrame, err)
	}
	switch f.Type {
	case chatHello:
	case chatMessage, chatBusy:
		if len(f.Text) > maxChatText {
			return chatFrame{}, fmt.Errorf("%w: message of %d bytes, at most %d", errChatFrame, len(f.Text), maxChatText)
		}
	case "":
		return chatFrame{}, fmt.Errorf("%w: no type", errChatFrame)
	default:
		return chatFrame{}, fmt.Errorf("%w %q", errChatUnknown, f.Type)
	}
	return f, nil
}

// printable makes a peer's text safe for a terminal: control characters (escape
// sequences could move the cursor or rewrite earlier lines) and bidirectional
// overrides (they could make one text read as another) become U+FFFD.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if (unicode.IsControl(r) && r != '\t') || unicode.Is(unicode.Bidi_Control, r) {
			return unicode.ReplacementChar
		}
		return r
	}, s)
}

// chatEvent is one line of --json output.
type chatEvent struct {
	Event  string     `json:"event"` // joined, message, method, left, turned_away
	Time   time.Time  `json:"time"`
	Peer   string     `json:"peer,omitempty"`
	Text   string     `json:"text,omitempty"`
	Sent   *time.Time `json:"sent,omitempty"` // the sender's clock
	Method string     `json:"method,omitempty"`
	Was    string     `json:"was,omitempty"`
	Reason string     `json:"reason,omitempty"`
}

func runChat(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink chat", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nodeFlags
	nf.register(fs)
	listen := fs.Bool("listen", false, "wait for nodes to chat with, one at a time, instead of connecting")
	timeout := fs.Duration("timeout", 10*time.Second, "give up connecting after this long")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink chat [--server URL] [--identity FILE] [--stun HOST:PORT ...] [--relay HOST:PORT] [--json] <node>
       peerlink chat --listen [node flags] [--json]

Chat across NATs, one line a message. Connects to <node> (or, with --listen, waits for
a node to connect; after it leaves, for the next), and sends every line of stdin as a
message over an encrypted stream. Messages that arrive print as
  HH:MM:SS <peer> text
with lines marked * when the peer joins or leaves and when the connection's method
(direct, punched, relayed) changes. End of stdin (Ctrl-D) ends the chat: the peer sees
you leave. With --json every line of stdout is a JSON object: "joined", "message",
"method", "left" or "turned_away" (another node tried to join while a chat was on).

Exit status: 0 when the chat ended (end of stdin, the peer left, or Ctrl-C), 1 when it
could not start or the connection was lost, 2 bad usage.

Examples:
  peerlink chat --listen                 # on one machine; prints its NodeID
  peerlink chat pl4bq...                 # on the other; type, Enter sends
  echo "build 42 is green" | peerlink chat pl4bq...

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

	c := &chat{json: nf.json, stdout: stdout, stderr: stderr}
	done := make(chan struct{})
	defer close(done)
	lines := readLines(chatStdin, stderr, done)
	if *listen {
		return c.listen(ctx, p, *timeout, lines)
	}
	sess, err := p.dial(ctx, target, *timeout, "peerlink chat --listen")
	if err != nil {
		return err
	}
	st, err := sess.OpenStream(ctx)
	if err != nil {
		sess.Close()
		return fmt.Errorf("chat stream to %s: %w", target.Short(), err)
	}
	_, err = c.converse(ctx, sess, st, bufio.NewReader(st), lines, nil)
	return err
}

// readLines sends r's lines (without line ends, empty ones skipped) on the channel it
// returns, which is closed at r's end. The goroutine cannot be stopped while blocked in
// Read (stdin cannot be interrupted): it notices done at its next line, and otherwise
// ends with the process.
func readLines(r io.Reader, stderr io.Writer, done <-chan struct{}) <-chan string {
	ch := make(chan string)
	go func() {
		defer close(ch)
		br := bufio.NewReader(r)
		for {
			line, err := br.ReadString('\n')
			line = strings.TrimRight(line, "\r\n")
			if line != "" {
				select {
				case ch <- line:
				case <-done:
					return
				}
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					fmt.Fprintf(stderr, "peerlink chat: reading stdin: %v\n", err)
				}
				return
			}
		}
	}()
	return ch
}

// chat is one run of peerlink chat.
type chat struct {
	json bool
	// turnAway, set when listening, answers a node that connects during a chat.
	turnAway func(conn *connect.Conn, busyWith identity.NodeID)
	mu       sync.Mutex // serialises output
	stdout   io.Writer
	stderr   io.Writer
}

// emit prints ev as a JSON line, or text after the time of day.
func (c *chat) emit(ev chatEvent, text string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ev.Time = time.Now()
	if c.json {
		ev.Time = ev.Time.UTC()
		writeJSONLine(c.stdout, ev)
		return
	}
	fmt.Fprintf(c.stdout, "%s %s\n", clockTime(ev.Time), text)
}

// chatEnd says how a conversation ended.
type chatEnd int

const (
	chatPeerLeft chatEnd = iota // the peer left (or was lost): a listener waits for the next
	chatStdinEnd                // this side's stdin ended
	chatStopped                 // interrupted
)

// listen chats with the nodes that connect, one at a time, until stdin ends or ctx
// is done.
func (c *chat) listen(ctx context.Context, p *clientNode, timeout time.Duration, lines <-chan string) error {
	fmt.Fprintf(c.stderr, "peerlink chat: listening as %s\n", p.id.NodeID())
	actx, cancel := context.WithCancel(ctx)
	conns := make(chan *connect.Conn)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	c.turnAway = func(conn *connect.Conn, busyWith identity.NodeID) {
		wg.Go(func() {
			sess, st, err := c.welcome(actx, p, conn, timeout)
			if err != nil {
				return
			}
			defer sess.Close()
			writeJSONLine(st, chatFrame{Type: chatBusy, Text: "already chatting with " + busyWith.String(), Time: time.Now().UTC()})
			st.Close()
			select { // for the peer to read it and close
			case <-sess.Done():
			case <-time.After(chatLinger):
			case <-actx.Done():
			}
		})
	}
	wg.Go(func() {
		for {
			conn, err := p.node.Accept(actx)
			if err != nil {
				return
			}
			select {
			case conns <- conn:
			case <-actx.Done():
				conn.Close()
				return
			}
		}
	})
	for {
		select {
		case <-ctx.Done():
			return nil
		case line, ok := <-lines:
			if !ok {
				return nil
			}
			fmt.Fprintf(c.stderr, "peerlink chat: no one has joined yet: not sent: %q\n", line)
		case conn := <-conns:
			sess, st, err := c.welcome(ctx, p, conn, timeout)
			if err != nil {
				fmt.Fprintf(c.stderr, "peerlink chat: %v\n", err)
				continue
			}
			end, err := c.converse(ctx, sess, st, bufio.NewReader(st), lines, conns)
			if err != nil {
				fmt.Fprintf(c.stderr, "peerlink chat: %v; waiting for the next node\n", err)
			}
			if end != chatPeerLeft {
				return nil
			}
		}
	}
}

// welcome starts the session on an accepted connection and takes the chat stream the
// peer opens.
func (c *chat) welcome(ctx context.Context, p *clientNode, conn *connect.Conn, timeout time.Duration) (*session.Session, *session.Stream, error) {
	sess, err := p.secure(ctx, conn, timeout)
	if err != nil {
		return nil, nil, err
	}
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	st, err := sess.AcceptStream(actx)
	if err != nil {
		sess.Close()
		return nil, nil, fmt.Errorf("%s connected but opened no chat stream within %v: %w", sess.Peer().Short(), timeout, err)
	}
	return sess, st, nil
}

// converse runs one chat on st until either side ends it, and closes sess. Connections
// that arrive on others meanwhile are turned away. An error means the connection was
// lost or the peer was busy.
func (c *chat) converse(ctx context.Context, sess *session.Session, st *session.Stream, br *bufio.Reader, lines <-chan string, others <-chan *connect.Conn) (chatEnd, error) {
	peer := sess.Peer()
	method := sess.Method()
	if err := writeJSONLine(st, chatFrame{Type: chatHello, Time: time.Now().UTC()}); err != nil {
		sess.Close()
		return chatPeerLeft, fmt.Errorf("chat stream to %s: %w", peer.Short(), err)
	}

	frames := make(chan chatFrame)
	readErr := make(chan error, 1)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() {
		close(stop)
		sess.Close() // ends a read in progress
		wg.Wait()
	}()
	wg.Go(func() {
		for {
			line, err := readLine(br, maxChatLine)
			if err != nil {
				readErr <- err
				return
			}
			f, err := parseChatFrame(line)
			if errors.Is(err, errChatUnknown) {
				continue
			}
			if err != nil {
				readErr <- err
				return
			}
			select {
			case frames <- f:
			case <-stop:
				return
			}
		}
	})

	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var linger <-chan time.Time // set once this side has finished writing
	for {
		select {
		case f := <-frames:
			switch f.Type {
			case chatHello:
				method = sess.Method()
				c.emit(chatEvent{Event: "joined", Peer: peer.String(), Method: method.String()},
					fmt.Sprintf("* %s joined (%s)", peer.Short(), method))
				continue
			case chatBusy:
				return chatPeerLeft, fmt.Errorf("%s is busy (%s): try again later", peer.Short(), printable(f.Text))
			}
			ev := chatEvent{Event: "message", Peer: peer.String(), Text: f.Text}
			if !f.Time.IsZero() {
				ev.Sent = &f.Time
			}
			c.emit(ev, peer.Short()+" "+printable(f.Text))

		case err := <-readErr:
			if linger != nil {
				return chatStdinEnd, nil // we were leaving; the peer has finished too
			}
			if errors.Is(err, io.EOF) || peerClosed(err) {
				c.emit(chatEvent{Event: "left", Peer: peer.String(), Reason: "left"}, fmt.Sprintf("* %s left", peer.Short()))
				if errors.Is(err, io.EOF) {
					// The peer waits for our end of the stream, then closes the
					// session: waiting for that lets what we sent last arrive.
					st.Close()
					select {
					case <-sess.Done():
					case <-time.After(chatLinger):
					case <-ctx.Done():
					}
				}
				return chatPeerLeft, nil
			}
			reason := "connection lost: " + err.Error()
			c.emit(chatEvent{Event: "left", Peer: peer.String(), Reason: reason}, fmt.Sprintf("* %s left (%s)", peer.Short(), reason))
			return chatPeerLeft, fmt.Errorf("connection to %s lost: %w", peer.Short(), err)

		case line, ok := <-lines:
			if !ok {
				// End of stdin: end our side and give the peer a moment to end its own.
				lines = nil
				st.Close()
				linger = time.After(chatLinger)
				continue
			}
			if len(line) > maxChatText {
				fmt.Fprintf(c.stderr, "peerlink chat: message of %d bytes not sent: at most %d\n", len(line), maxChatText)
				continue
			}
			if err := writeJSONLine(st, chatFrame{Type: chatMessage, Text: line, Time: time.Now().UTC()}); err != nil {
				if peerClosed(err) {
					c.emit(chatEvent{Event: "left", Peer: peer.String(), Reason: "left"}, fmt.Sprintf("* %s left; not sent: %q", peer.Short(), line))
					return chatPeerLeft, nil
				}
				reason := "connection lost: " + err.Error()
				c.emit(chatEvent{Event: "left", Peer: peer.String(), Reason: reason}, fmt.Sprintf("* %s left (%s)", peer.Short(), reason))
				return chatPeerLeft, fmt.Errorf("sending to %s: %w", peer.Short(), err)
			}

		case <-linger:
			return chatStdinEnd, nil

		case <-tick.C:
			if m := sess.Method(); m != method {
				c.emit(chatEvent{Event: "method", Peer: peer.String(), Method: m.String(), Was: method.String()},
					fmt.Sprintf("* connection to %s now %s (was %s)", peer.Short(), m, method))
				method = m
			}

		case conn := <-others:
			other := conn.Peer()
			c.turnAway(conn, peer)
			c.emit(chatEvent{Event: "turned_away", Peer: other.String(), Reason: "already chatting with " + peer.String()},
				fmt.Sprintf("* turned away %s: already chatting with %s", other.Short(), peer.Short()))

		case <-ctx.Done():
			return chatStopped, nil
		}
	}
}
