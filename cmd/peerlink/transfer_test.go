package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSendReceive sends a multi-megabyte file between the real binaries and checks it
// arrives whole, with matching --json reports on both sides; then that a receiver
// refuses a node not in --accept (and keeps waiting) and refuses to replace the file,
// with both ends exiting 1 and the file untouched.
func TestSendReceive(t *testing.T) {
	t.Parallel()
	server, stunAddr := servers(t)
	node := func(args ...string) []string {
		return append(args, "--server", server, "--stun", stunAddr)
	}
	data := make([]byte, 5<<20+123)
	rand.Read(data)
	sum := sha256.Sum256(data)
	src := filepath.Join(t.TempDir(), "big.bin")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	recvKey, recvID := newNode(t, "receiver")
	sendKey, sendID := newNode(t, "sender")

	recv := startProc(t, "receive", false, node("receive", "--json", "--dir", dir, "--identity", recvKey)...)
	recv.await(recv.stderr, "listening as "+recvID.String())
	stdout, stderr, code := runEnv(t, nil, node("send", "--json", "--identity", sendKey, recvID.String(), src)...)
	if code != 0 {
		t.Fatalf("send: exit %d\n%s\n%s", code, stdout, stderr)
	}
	var sent transferJSON
	if err := json.Unmarshal([]byte(stdout), &sent); err != nil {
		t.Fatalf("send --json: %v\n%s", err, stdout)
	}
	if sent.File != src || sent.Bytes != int64(len(data)) || sent.SHA256 != hex.EncodeToString(sum[:]) || sent.Method != "direct" || sent.Rate <= 0 || sent.Seconds <= 0 {
		t.Errorf("send --json: %+v", sent)
	}
	if !strings.Contains(stderr, "100% 5.0 MiB / 5.0 MiB") {
		t.Errorf("sender's progress lacks the final line:\n%s", stderr)
	}
	if code := recv.exit(); code != 0 {
		t.Fatalf("receive: exit %d\n%s", code, recv.stderr)
	}
	var got transferJSON
	if err := json.Unmarshal([]byte(recv.stdout.String()), &got); err != nil {
		t.Fatalf("receive --json: %v\n%s", err, recv.stdout)
	}
	want := filepath.Join(dir, "big.bin")
	if got.File != want || got.Bytes != sent.Bytes || got.SHA256 != sent.SHA256 || got.Peer != sendID.String() || got.Method != "direct" {
		t.Errorf("receive --json: %+v; want %s, %d bytes, sha256 %s from %s", got, want, sent.Bytes, sent.SHA256, sendID)
	}
	if b, err := os.ReadFile(want); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("received file: %d bytes, %v; not the sent %d", len(b), err, len(data))
	}
	assertOnly(t, dir, "big.bin")

	// A receiver that takes files from the sender only: a stranger is refused, then the
	// sender too, as big.bin is there.
	stat0, _ := os.Stat(want)
	recv = startProc(t, "receive --accept", false, node("receive", "--dir", dir, "--identity", recvKey, "--accept", sendID.String())...)
	recv.await(recv.stderr, "listening as ")
	strangerKey, strangerID := newNode(t, "stranger")
	_, stderr, code = runEnv(t, nil, node("send", "--identity", strangerKey, recvID.String(), src)...)
	if code != 1 || !strings.Contains(stderr, "does not take files from "+strangerID.String()) || !strings.Contains(stderr, "--accept") {
		t.Errorf("send from a stranger: exit %d, want 1 saying it is not accepted:\n%s", code, stderr)
	}
	select {
	case <-recv.done:
		t.Fatalf("the receiver exited after refusing a stranger\n%s", recv.stderr)
	default:
	}
	_, stderr, code = runEnv(t, nil, node("send", "--identity", sendKey, recvID.String(), src)...)
	if code != 1 || !strings.Contains(stderr, "already has a file named big.bin") {
		t.Errorf("send over an existing file: exit %d, want 1 saying it exists:\n%s", code, stderr)
	}
	if code := recv.exit(); code != 1 || !strings.Contains(recv.stderr.String(), "--force") {
		t.Errorf("receive over an existing file: exit %d, want 1 suggesting --force:\n%s", code, recv.stderr)
	}
	if stat1, err := os.Stat(want); err != nil || !stat1.ModTime().Equal(stat0.ModTime()) {
		t.Errorf("the existing file was touched: %v", err)
	}
	assertOnly(t, dir, "big.bin")
}

// assertOnly fails unless dir holds exactly the named files: no temporary ones left.
func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Errorf("%s holds %q, want %q", dir, got, names)
	}
}

func TestSendUsage(t *testing.T) {
	t.Parallel()
	node := "pl" + strings.Repeat("a", 10)
	_, id := newNode(t, "x")
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{[]string{"send", "-h"}, 0, "Exit status:"},
		{[]string{"send", id.String()}, 2, "want <node> FILE"},
		{[]string{"send", node, "f"}, 2, "peerlink send:"},
		{[]string{"send", id.String(), t.TempDir()}, 2, "not a regular file"},
		{[]string{"send", id.String(), filepath.Join(t.TempDir(), "missing")}, 1, "cannot read the file to send"},
		{[]string{"receive", "-h"}, 0, "--accept"},
		{[]string{"receive", "--dir", filepath.Join(t.TempDir(), "missing")}, 1, "create it first"},
		{[]string{"receive", "--accept", "nonsense"}, 2, "--accept"},
		{[]string{"receive", "extra"}, 2, "unexpected argument"},
	}
	for _, tt := range tests {
		stdout, stderr, code := runEnv(t, nil, tt.args...)
		if code != tt.code || !strings.Contains(stdout+stderr, tt.contains) {
			t.Errorf("peerlink %q: exit %d, want %d; output does not contain %q:\n%s%s", tt.args, code, tt.code, tt.contains, stdout, stderr)
		}
	}
}

// TestReceiveInto checks the receiver's side of a transfer against what a sender (or
// the network) may do: the file is kept only when all its data and a matching SHA-256
// arrived, never outside the directory, never over an existing file without force, and
// nothing is left behind otherwise.
func TestReceiveInto(t *testing.T) {
	data := make([]byte, 100<<10+7)
	rand.Read(data)
	sum := sha256.Sum256(data)
	stream := func(data []byte, sum [32]byte) []byte { return append(append([]byte(nil), data...), sum[:]...) }
	flipped := stream(data, sum)
	flipped[len(data)/2] ^= 0x40
	badSum := sum
	badSum[0] ^= 1

	tests := []struct {
		name     string
		header   string // the sender's header line
		in       []byte // what follows it on the stream
		existing string // content of an existing file of the same name
		force    bool
		wantErr  error
		wantFile string // where the data should land (relative to the directory)
	}{
		{"good", `{"v":1,"name":"a.bin","size":102407}`, stream(data, sum), "", false, nil, "a.bin"},
		{"corrupted data", `{"v":1,"name":"a.bin","size":102407}`, flipped, "", false, errChecksum, ""},
		{"corrupted checksum", `{"v":1,"name":"a.bin","size":102407}`, stream(data, badSum), "", false, errChecksum, ""},
		{"cut in the data", `{"v":1,"name":"a.bin","size":102407}`, data[:5000], "", false, errShort, ""},
		{"cut in the checksum", `{"v":1,"name":"a.bin","size":102407}`, stream(data, sum)[:len(data)+10], "", false, errShort, ""},
		{"exists", `{"v":1,"name":"a.bin","size":102407}`, stream(data, sum), "old", false, errExists, ""},
		{"exists, force", `{"v":1,"name":"a.bin","size":102407}`, stream(data, sum), "old", true, nil, "a.bin"},
		{"corrupted does not replace with force", `{"v":1,"name":"a.bin","size":102407}`, flipped, "old", true, errChecksum, ""},
		{"traversal", `{"v":1,"name":"../../evil.bin","size":102407}`, stream(data, sum), "", false, nil, "evil.bin"},
		{"absolute", `{"v":1,"name":"/etc/cron.d/evil","size":102407}`, stream(data, sum), "", false, nil, "evil"},
		{"windows traversal", `{"v":1,"name":"..\\..\\evil.bin","size":102407}`, stream(data, sum), "", false, nil, "evil.bin"},
		{"empty file", `{"v":1,"name":"empty","size":0}`, stream(nil, sha256.Sum256(nil)), "", false, nil, "empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent := t.TempDir()
			dir := filepath.Join(parent, "inbox", "deep")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			root, err := os.OpenRoot(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer root.Close()
			h, err := parseFileHeader([]byte(tt.header))
			if err != nil {
				t.Fatal(err)
			}
			if tt.existing != "" {
				os.WriteFile(filepath.Join(dir, h.Name), []byte(tt.existing), 0o644)
			}
			var count progressCount
			got, err := receiveInto(root, h, bytes.NewReader(tt.in), tt.force, &count)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("receiveInto: %v, want %v", err, tt.wantErr)
			}
			var names []string
			if tt.existing != "" || tt.wantFile != "" {
				names = append(names, h.Name)
			}
			assertOnly(t, dir, names...)
			if ents, _ := os.ReadDir(parent); len(ents) != 1 {
				t.Errorf("something was written next to the directory: %v", ents)
			}
			b, _ := os.ReadFile(filepath.Join(dir, h.Name))
			switch {
			case tt.wantFile != "":
				if h.Name != tt.wantFile || !bytes.Equal(b, tt.in[:h.Size]) || got != sha256.Sum256(b) {
					t.Errorf("kept %s (%d bytes), want the data in %s", h.Name, len(b), tt.wantFile)
				}
				if int64(count) != h.Size {
					t.Errorf("progress counted %d bytes of %d", count, h.Size)
				}
			case tt.existing != "" && string(b) != tt.existing:
				t.Errorf("the existing file was changed to %d bytes", len(b))
			}
		})
	}
}

type progressCount int64

func (c *progressCount) Write(b []byte) (int, error) {
	*c += progressCount(len(b))
	return len(b), nil
}

// TestSendData: what sendData writes is what receiveInto keeps; a file that shrinks
// while being sent is an error.
func TestSendData(t *testing.T) {
	data := make([]byte, 300<<10)
	rand.Read(data)
	var wire bytes.Buffer
	var count progressCount
	sum, err := sendData(&wire, bytes.NewReader(data), int64(len(data)), &count)
	if err != nil || sum != sha256.Sum256(data) || int(count) != len(data) {
		t.Fatalf("sendData: %x, %v, counted %d", sum, err, count)
	}
	root, err := os.OpenRoot(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if _, err := receiveInto(root, fileHeader{V: 1, Name: "x", Size: int64(len(data))}, &wire, false, nil); err != nil {
		t.Fatalf("receiveInto what sendData wrote: %v", err)
	}
	if _, err := sendData(&wire, bytes.NewReader(data[:10]), 20, &count); err == nil || !strings.Contains(err.Error(), "shrank") {
		t.Errorf("sendData of a short file: %v, want it to say the file shrank", err)
	}
}

func TestSanitizeName(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"report.pdf", "report.pdf", true},
		{"../../etc/passwd", "passwd", true},
		{`C:\Users\me\notes.txt`, "notes.txt", true},
		{"dir/", "", false},
		{"..", "", false},
		{".", "", false},
		{"a/..", "", false},
		{"", "", false},
		{".hidden", ".hidden", true},
		{"...", "...", true},
		{"tab\tand\nnewline\x1b", "tab_and_newline_", true},
		{"evil\u202Egpj.exe", "evil_gpj.exe", true},
		{"bad\xffutf8", "bad_utf8", true},
		{strings.Repeat("n", 255), strings.Repeat("n", 255), true},
		{strings.Repeat("n", 256), "", false},
	}
	for _, tt := range tests {
		got, err := sanitizeName(tt.in)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("sanitizeName(%q) = %q, %v; want %q, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestParseFileHeader(t *testing.T) {
	tests := []struct {
		line string
		want fileHeader
		ok   bool
	}{
		{`{"v":1,"name":"a.txt","size":12}`, fileHeader{1, "a.txt", 12}, true},
		{`{"v":1,"name":"../a.txt","size":0,"future":"field"}`, fileHeader{1, "a.txt", 0}, true},
		{`{"v":2,"name":"a.txt","size":12}`, fileHeader{}, false},
		{`{"name":"a.txt","size":12}`, fileHeader{}, false},
		{`{"v":1,"name":"a.txt","size":-1}`, fileHeader{}, false},
		{`{"v":1,"name":"a.txt","size":1125899906842625}`, fileHeader{}, false},
		{`{"v":1,"name":"..","size":1}`, fileHeader{}, false},
		{`{"v":1,"size":1}`, fileHeader{}, false},
		{`{"v":1,"name":"a","size":"12"}`, fileHeader{}, false},
		{`garbage`, fileHeader{}, false},
	}
	for _, tt := range tests {
		got, err := parseFileHeader([]byte(tt.line))
		if got != tt.want || (err == nil) != tt.ok || (err != nil && !errors.Is(err, errBadHeader)) {
			t.Errorf("parseFileHeader(%s) = %+v, %v; want %+v, ok %v", tt.line, got, err, tt.want, tt.ok)
		}
	}
}

// FuzzParseFileHeader: no header makes the parser panic or accept a name that leaves
// the receiver's directory, and what it accepts survives a round trip unchanged.
func FuzzParseFileHeader(f *testing.F) {
	f.Add([]byte(`{"v":1,"name":"a.txt","size":12}`))
	f.Add([]byte(`{"v":1,"name":"../../etc/passwd","size":0}`))
	f.Add([]byte(`{"v":1,"name":"..\\..\\x","size":1}`))
	f.Add([]byte(`{"v":1,"name":"\u0000\u202e..","size":1125899906842624}`))
	f.Add([]byte(`{"v":1,"name":"a","size":1e3}`))
	f.Add([]byte(`{"V":1,"NAME":"b","Size":5}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		h, err := parseFileHeader(line)
		if err != nil {
			return
		}
		if h.Size < 0 || h.Size > maxFileSize || len(h.Name) > maxNameLen {
			t.Fatalf("accepted %+v", h)
		}
		if h.Name == "." || h.Name == ".." || strings.ContainsAny(h.Name, "/\\\x00") || !filepath.IsLocal(h.Name) || filepath.Base(h.Name) != h.Name {
			t.Fatalf("accepted name %q, which is not one file in the directory", h.Name)
		}
		b, _ := json.Marshal(h)
		again, err := parseFileHeader(b)
		if err != nil || again != h {
			t.Fatalf("round trip of %+v: %+v, %v", h, again, err)
		}
	})
}

func TestRenderProgress(t *testing.T) {
	tests := []struct {
		done, total int64
		elapsed     time.Duration
		bar         bool
		want        string
	}{
		{0, 10 << 20, 0, false, "sending f   0% 0 B / 10.0 MiB 0 B/s ETA --:--"},
		{5 << 20, 10 << 20, 2 * time.Second, false, "sending f  50% 5.0 MiB / 10.0 MiB 2.5 MiB/s ETA 0:02"},
		{5 << 20, 10 << 20, 2 * time.Second, true, "sending f [##########..........]  50% 5.0 MiB / 10.0 MiB 2.5 MiB/s ETA 0:02"},
		{10 << 20, 10 << 20, 4 * time.Second, true, "sending f [####################] 100% 10.0 MiB / 10.0 MiB 2.5 MiB/s in 4s"},
		{1 << 20, 4 << 30, time.Second, false, "sending f   0% 1.0 MiB / 4.0 GiB 1.0 MiB/s ETA 1:08:15"},
		{0, 0, time.Millisecond, false, "sending f 100% 0 B / 0 B 0 B/s in 0s"},
	}
	for _, tt := range tests {
		if got := renderProgress("sending f", tt.done, tt.total, tt.elapsed, tt.bar); got != tt.want {
			t.Errorf("renderProgress(%d, %d, %v, %v)\n got %q\nwant %q", tt.done, tt.total, tt.elapsed, tt.bar, got, tt.want)
		}
	}
}

func TestFormatBytes(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"},
		{5<<20 + 123, "5.0 MiB"}, {3 << 30, "3.0 GiB"}, {2 << 40, "2.0 TiB"}, {1 << 50, "1.0 PiB"}, {1 << 60, "1024.0 PiB"},
	}
	for _, tt := range tests {
		if got := formatBytes(tt.n); got != tt.want {
			t.Errorf("formatBytes(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}

// TestProgressNotTerminal: to a pipe or file, progress is plain lines, no redrawing.
func TestProgressNotTerminal(t *testing.T) {
	var buf lockedBuffer
	p := startProgress(&buf, "receiving x", 100)
	p.Write(make([]byte, 100))
	p.Stop()
	p.Stop()
	if out := buf.String(); strings.ContainsAny(out, "\r\x1b") || !strings.HasPrefix(out, "receiving x 100% 100 B / 100 B") {
		t.Errorf("progress to a buffer: %q", out)
	}
	if f, err := os.Open(os.DevNull); err == nil {
		if isTerminal(f) {
			t.Errorf("%s counts as a terminal", os.DevNull)
		}
		f.Close()
	}
}
