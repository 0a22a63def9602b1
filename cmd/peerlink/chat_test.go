package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"peerlink/identity"
)

// proc is a peerlink child process whose output the test watches while it runs.
type proc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser // nil unless asked for
	stdout *lockedBuffer
	stderr *lockedBuffer
	done   chan struct{}
	err    error // Wait's result, once done
}

// startProc runs peerlink with args; with pipeIn its stdin is a pipe the test writes,
// else it is empty. The process is killed at cleanup if it is still running.
func startProc(t *testing.T, name string, pipeIn bool, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, cmd: exec.Command(binary, args...), stdout: &lockedBuffer{}, stderr: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd.Env = cleanEnv()
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if pipeIn {
		w, err := p.cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		p.stdin = w
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill() // the process this test started, by its PID
			<-p.done
		}
	})
	return p
}

// await waits until the process's stdout or stderr (out) matches re.
func (p *proc) await(out *lockedBuffer, re string) string {
	p.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(15 * time.Second)
	for {
		if m := rx.FindString(out.String()); m != "" {
			return m
		}
		select {
		case <-p.done:
			if m := rx.FindString(out.String()); m != "" {
				return m
			}
			p.t.Fatalf("%s exited (%v) before printing %q\nstdout:\n%s\nstderr:\n%s", p.name, p.err, re, p.stdout, p.stderr)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s never printed %q\nstdout:\n%s\nstderr:\n%s", p.name, re, p.stdout, p.stderr)
		}
	}
}

// exit waits for the process to end and returns its exit code.
func (p *proc) exit() int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.t.Fatalf("%s did not exit\nstdout:\n%s\nstderr:\n%s", p.name, p.stdout, p.stderr)
	}
	var ee *exec.ExitError
	switch {
	case p.err == nil:
		return 0
	case errors.As(p.err, &ee):
		return ee.ExitCode()
	}
	p.t.Fatalf("%s: %v", p.name, p.err)
	return -1
}

// interrupt sends SIGINT, as Ctrl-C would, and returns the exit code.
func (p *proc) interrupt() int {
	p.t.Helper()
	p.cmd.Process.Signal(os.Interrupt)
	return p.exit()
}

// newNode makes an identity file and returns its path and NodeID.
func newNode(t *testing.T, name string) (string, identity.NodeID) {
	t.Helper()
	key := filepath.Join(t.TempDir(), name+".key")
	id, err := identity.ParseNodeID(nodeIDOf(t, key))
	if err != nil {
		t.Fatal(err)
	}
	return key, id
}

// TestChat chats both ways between `peerlink chat --listen` and two clients in turn:
// messages arrive as "HH:MM:SS <peer> text" with the peer's control characters made
// harmless, joins and leaves show on both sides, a node that comes during a chat is
// told the listener is busy, end of stdin ends a chat cleanly, and the listener then
// takes the next node.
func TestChat(t *testing.T) {
	t.Parallel()
	server, stunAddr := servers(t)
	lisKey, lisID := newNode(t, "listener")
	clKey, clID := newNode(t, "client")
	lis := startProc(t, "chat --listen", true, "chat", "--listen", "--identity", lisKey, "--server", server, "--stun", stunAddr)
	lis.await(lis.stderr, "listening as "+lisID.String())

	cl := startProc(t, "chat <node>", true, "chat", "--identity", clKey, "--server", server, "--stun", stunAddr, lisID.String())
	lis.await(lis.stdout, `(?m)^\d\d:\d\d:\d\d \* `+clID.Short()+` joined \(direct\)$`)
	cl.await(cl.stdout, `(?m)^\d\d:\d\d:\d\d \* `+lisID.Short()+` joined \(direct\)$`)

	io.WriteString(cl.stdin, "hello from the client\n\n")
	lis.await(lis.stdout, `(?m)^\d\d:\d\d:\d\d `+clID.Short()+` hello from the client$`)
	io.WriteString(lis.stdin, "hi \x1b[2Jback\r\n")
	cl.await(cl.stdout, `(?m)^\d\d:\d\d:\d\d `+lisID.Short()+` hi \x{FFFD}\[2Jback$`)

	// A third node is turned away while the chat is on, and told why.
	busyKey, busyID := newNode(t, "busy")
	_, stderr, code := runEnv(t, nil, "chat", "--identity", busyKey, "--server", server, "--stun", stunAddr, lisID.String())
	if code != 1 || !strings.Contains(stderr, lisID.Short()+" is busy (already chatting with "+clID.String()+")") {
		t.Errorf("chat with a busy listener: exit %d, want 1 saying it is busy:\n%s", code, stderr)
	}
	lis.await(lis.stdout, `(?m)^\d\d:\d\d:\d\d \* turned away `+busyID.Short()+`: already chatting with `+clID.Short()+`$`)

	cl.stdin.Close()
	if code := cl.exit(); code != 0 {
		t.Fatalf("client exit %d after end of stdin\n%s", code, cl.stderr)
	}
	lis.await(lis.stdout, `(?m)^\d\d:\d\d:\d\d \* `+clID.Short()+` left$`)
	if strings.Count(lis.stdout.String(), "hello from the client") != 1 {
		t.Errorf("the empty line was sent as a message, or the message twice:\n%s", lis.stdout)
	}

	// The listener is still there for the next node; this one speaks JSON and leaves
	// as soon as its one line is sent.
	cl2Key, cl2ID := newNode(t, "client2")
	cl2 := exec.Command(binary, "chat", "--json", "--identity", cl2Key, "--server", server, "--stun", stunAddr, lisID.String())
	cl2.Env = cleanEnv()
	cl2.Stdin = strings.NewReader("second client's only line")
	out, err := cl2.Output()
	if err != nil {
		t.Fatalf("second client: %v\n%s", err, out)
	}
	lis.await(lis.stdout, `(?m)^\d\d:\d\d:\d\d `+cl2ID.Short()+` second client's only line$`)
	lis.await(lis.stdout, `(?m)^\d\d:\d\d:\d\d \* `+cl2ID.Short()+` left$`)
	var ev chatEvent
	if err := json.NewDecoder(strings.NewReader(string(out))).Decode(&ev); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out)
	}
	if ev.Event != "joined" || ev.Peer != lisID.String() || ev.Method != "direct" {
		t.Errorf("second client's first event: %+v, want joined %s direct", ev, lisID)
	}

	lis.stdin.Close()
	if code := lis.exit(); code != 0 {
		t.Fatalf("listener exit %d after end of stdin\n%s", code, lis.stderr)
	}
}

func TestParseChatFrame(t *testing.T) {
	tests := []struct {
		line    string
		want    chatFrame
		wantErr error
	}{
		{`{"type":"chat_message","text":"hi","time":"2026-01-02T03:04:05Z"}`, chatFrame{Type: chatMessage, Text: "hi", Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}, nil},
		{`{"type":"hello","time":"2026-01-02T03:04:05Z"}`, chatFrame{Type: chatHello, Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}, nil},
		{`{"type":"chat_message","text":"no time"}`, chatFrame{Type: chatMessage, Text: "no time"}, nil},
		{`{"type":"busy","text":"already chatting with pl4bq"}`, chatFrame{Type: chatBusy, Text: "already chatting with pl4bq"}, nil},
		{`{"type":"typing"}`, chatFrame{}, errChatUnknown},
		{`{"text":"no type"}`, chatFrame{}, errChatFrame},
		{`not json`, chatFrame{}, errChatFrame},
		{`{"type":"chat_message","time":"yesterday"}`, chatFrame{}, errChatFrame},
		{`{"type":"chat_message","text":"` + strings.Repeat("x", maxChatText+1) + `"}`, chatFrame{}, errChatFrame},
	}
	for _, tt := range tests {
		got, err := parseChatFrame([]byte(tt.line))
		if !errors.Is(err, tt.wantErr) || (err == nil && !got.Time.Equal(tt.want.Time)) || got.Type != tt.want.Type || got.Text != tt.want.Text {
			t.Errorf("parseChatFrame(%.60q) = %+v, %v; want %+v, %v", tt.line, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestPrintable(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain text", "plain text"},
		{"tab\tkept", "tab\tkept"},
		{"\x1b[31mred", "\uFFFD[31mred"},
		{"bell\a and\r return", "bell\uFFFD and\uFFFD return"},
		{"evil\u202Egnp.exe", "evil\uFFFDgnp.exe"},
		{"ünïcödé ok", "ünïcödé ok"},
	}
	for _, tt := range tests {
		if got := printable(tt.in); got != tt.want {
			t.Errorf("printable(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestReadLine(t *testing.T) {
	tests := []struct {
		in      string
		max     int
		want    []string
		wantErr error
	}{
		{"a\nbb\n", 2, []string{"a", "bb"}, io.EOF},
		{"abc\n", 2, nil, errLineTooLong},
		{"ab", 5, nil, io.ErrUnexpectedEOF},
		{"", 5, nil, io.EOF},
		{"\n\n", 0, []string{"", ""}, io.EOF},
		{strings.Repeat("x", 40) + "\n", 40, []string{strings.Repeat("x", 40)}, io.EOF},
		{strings.Repeat("x", 41) + "\n", 40, nil, errLineTooLong},
	}
	for _, tt := range tests {
		br := bufio.NewReaderSize(strings.NewReader(tt.in), 16) // lines longer than the buffer too
		var got []string
		var err error
		for {
			var line []byte
			if line, err = readLine(br, tt.max); err != nil {
				break
			}
			got = append(got, string(line))
		}
		if !errors.Is(err, tt.wantErr) || strings.Join(got, "|") != strings.Join(tt.want, "|") {
			t.Errorf("readLine(%q, %d): %q then %v; want %q then %v", tt.in, tt.max, got, err, tt.want, tt.wantErr)
		}
	}
}

// FuzzParseChatFrame: whatever a peer sends, parsing does not panic, and what it
// accepts is a known frame within the limits that prints without control characters.
func FuzzParseChatFrame(f *testing.F) {
	f.Add([]byte(`{"type":"chat_message","text":"hi","time":"2026-01-02T03:04:05Z"}`))
	f.Add([]byte(`{"type":"hello","time":"2026-01-02T03:04:05.123+02:00"}`))
	f.Add([]byte(`{"type":"chat_message","text":"\u001b[2J\u202e"}`))
	f.Add([]byte(`{"type":"x"}`))
	f.Add([]byte(`{"type":"busy","text":"already chatting with pl4bq"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, line []byte) {
		fr, err := parseChatFrame(line)
		if err != nil {
			return
		}
		if fr.Type != chatHello && fr.Type != chatMessage && fr.Type != chatBusy {
			t.Fatalf("accepted frame of type %q", fr.Type)
		}
		if len(fr.Text) > maxChatText {
			t.Fatalf("accepted %d bytes of text", len(fr.Text))
		}
		for _, r := range printable(fr.Text) {
			if r != '\t' && (r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0)) {
				t.Fatalf("printable(%q) keeps control character %U", fr.Text, r)
			}
		}
	})
}

// FuzzReadLine: readLine never returns more than max bytes or a newline, and the lines
// it returns are the input's.
func FuzzReadLine(f *testing.F) {
	f.Add([]byte("a\nbb\n"), 2)
	f.Add([]byte("abc"), 1)
	f.Add([]byte("\n\n\n"), 0)
	f.Fuzz(func(t *testing.T, in []byte, max int) {
		if max < 0 || max > 1<<16 {
			return
		}
		br := bufio.NewReaderSize(strings.NewReader(string(in)), 16)
		var got []string
		for {
			line, err := readLine(br, max)
			if err != nil {
				break
			}
			if len(line) > max || strings.Contains(string(line), "\n") {
				t.Fatalf("readLine(_, %d) returned %q", max, line)
			}
			got = append(got, string(line))
		}
		if joined := strings.Join(got, "\n"); !strings.HasPrefix(string(in), joined) {
			t.Fatalf("lines %q are not the start of %q", got, in)
		}
	})
}
