package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestTunnel runs a TCP service behind `peerlink tunnel --expose` and reaches it through
// `peerlink tunnel <node> --local` with three connections open at once. The service
// speaks first and echoes only after the client's half-close, so it works only if a
// connection reaches it before the client sends anything and each direction's end is
// passed on. A node not in --allow is refused at once.
func TestTunnel(t *testing.T) {
	t.Parallel()
	server, stunAddr := servers(t)
	node := func(args ...string) []string {
		return append(args, "--server", server, "--stun", stunAddr)
	}
	svc, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var svcWG sync.WaitGroup
	t.Cleanup(func() {
		svc.Close()
		svcWG.Wait()
	})
	svcWG.Go(func() {
		for {
			c, err := svc.Accept()
			if err != nil {
				return
			}
			svcWG.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				c.Write([]byte("hello\n"))
				if b, err := io.ReadAll(c); err == nil {
					c.Write(b)
				}
			})
		}
	})

	exKey, exID := newNode(t, "expose")
	fwKey, fwID := newNode(t, "forward")
	ex := startProc(t, "tunnel --expose", false, node("tunnel", "--expose", svc.Addr().String(), "--allow", fwID.String(), "--json", "--identity", exKey)...)
	ex.await(ex.stderr, "listening as "+exID.String())
	fw := startProc(t, "tunnel <node>", false, node("tunnel", exID.String(), "--local", "127.0.0.1:0", "--json", "--identity", fwKey)...)
	var ready tunnelEvent
	if err := json.Unmarshal([]byte(fw.await(fw.stdout, `(?m)^\{"event":"ready".*$`)), &ready); err != nil {
		t.Fatal(err)
	}
	if ready.Peer != exID.String() || ready.Method != "direct" || ready.Local == "" {
		t.Fatalf("ready event: %+v", ready)
	}

	const conns = 3
	var greeted sync.WaitGroup // every connection is open before any sends
	greeted.Add(conns)
	errs := make(chan error, conns)
	for i := range conns {
		go func() {
			errs <- func() error {
				payload := make([]byte, 200<<10+i)
				rand.Read(payload)
				c, err := net.Dial("tcp", ready.Local)
				if err != nil {
					greeted.Done()
					return err
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(15 * time.Second))
				br := bufio.NewReader(c)
				hello, err := br.ReadString('\n')
				greeted.Done()
				if err != nil || hello != "hello\n" {
					return fmt.Errorf("connection %d: greeting %q, %v", i, hello, err)
				}
				greeted.Wait()
				if _, err := c.Write(payload); err != nil {
					return err
				}
				c.(*net.TCPConn).CloseWrite()
				back, err := io.ReadAll(br)
				if err != nil || !bytes.Equal(back, payload) {
					return fmt.Errorf("connection %d: %d bytes back (%v), want the %d sent", i, len(back), err, len(payload))
				}
				return nil
			}()
		}()
	}
	for range conns {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	for _, p := range []*proc{ex, fw} {
		p.await(p.stdout, `(?s)("event":"close".*){3}`)
		if n := strings.Count(p.stdout.String(), `"event":"open"`); n != conns {
			t.Errorf("%s logged %d connections, want %d:\n%s", p.name, n, conns, p.stdout)
		}
		if strings.Contains(p.stdout.String(), `"error"`) {
			t.Errorf("%s logged an error:\n%s", p.name, p.stdout)
		}
	}

	// With the service down, a connection through the tunnel is closed and both ends
	// say why; the tunnel stays up.
	svc.Close()
	c, err := net.Dial("tcp", ready.Local)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
		t.Errorf("connection to a service that is down: read %q, %v; want it closed", b, err)
	}
	c.Close()
	fw.await(fw.stdout, `"event":"close".*"error":"refused by the tunnel's far end: [^"]*cannot reach `+svc.Addr().String())
	ex.await(ex.stdout, `"event":"close".*"error":"dial tcp `)

	strangerKey, strangerID := newNode(t, "stranger")
	_, stderr, code := runEnv(t, nil, node("tunnel", exID.String(), "--local", "127.0.0.1:0", "--identity", strangerKey)...)
	if code != 1 || !strings.Contains(stderr, "may not use this tunnel") || !strings.Contains(stderr, "--allow "+strangerID.String()) {
		t.Errorf("a node not in --allow: exit %d, want 1 saying it may not:\n%s", code, stderr)
	}

	if code := fw.interrupt(); code != 0 {
		t.Errorf("tunnel <node> exit %d after SIGINT\n%s", code, fw.stderr)
	}
	ex.await(ex.stdout, `"event":"left","time":"[^"]*","peer":"`+fwID.String())
	if code := ex.interrupt(); code != 0 {
		t.Errorf("tunnel --expose exit %d after SIGINT\n%s", code, ex.stderr)
	}
}

func TestTunnelUsage(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args     []string
		contains string
	}{
		{[]string{"tunnel"}, "want --expose HOST:PORT, or <node> --local HOST:PORT"},
		{[]string{"tunnel", "--expose", "8080"}, "want HOST:PORT"},
		{[]string{"tunnel", "--expose", ":1", "--local", ":2"}, "pass one"},
		{[]string{"tunnel", "--expose", ":1", "pl4bq"}, "takes no <node>"},
		{[]string{"tunnel", "pl4bq"}, "--local"},
		{[]string{"tunnel", "--expose", ":1", "--allow", "x"}, "--allow \"x\""},
	}
	for _, tt := range tests {
		stdout, stderr, code := runEnv(t, nil, tt.args...)
		if code != 2 || !strings.Contains(stderr, tt.contains) {
			t.Errorf("peerlink %q: exit %d, want 2 saying %q:\n%s%s", tt.args, code, tt.contains, stdout, stderr)
		}
	}
	if stdout, stderr, code := runEnv(t, nil, "tunnel", "-h"); code != 0 || !strings.Contains(stderr, "Examples:") {
		t.Errorf("tunnel -h: exit %d\n%s%s", code, stdout, stderr)
	}
}

func TestTunnelLines(t *testing.T) {
	tests := []struct {
		line    string
		kind    string
		wantErr error
	}{
		{"peerlink-tunnel/1 check", "check", nil},
		{"peerlink-tunnel/1 connect", "connect", nil},
		{"peerlink-tunnel/1 connect 10.0.0.1:22", "", errTunnelProto}, // no address from the peer, ever
		{"peerlink-tunnel/2 connect", "", errTunnelProto},
		{"GET / HTTP/1.1", "", errTunnelProto},
		{"", "", errTunnelProto},
	}
	for _, tt := range tests {
		kind, err := parseTunnelRequest([]byte(tt.line))
		if kind != tt.kind || !errors.Is(err, tt.wantErr) {
			t.Errorf("parseTunnelRequest(%q) = %q, %v; want %q, %v", tt.line, kind, err, tt.kind, tt.wantErr)
		}
	}
	replies := []struct {
		line    string
		wantErr error
		says    string
	}{
		{"ok", nil, ""},
		{"error node X may not", errTunnelRefused, "node X may not"},
		{"error \x1b[2J", errTunnelRefused, "\uFFFD[2J"},
		{"okay", errTunnelProto, ""},
		{"", errTunnelProto, ""},
	}
	for _, tt := range replies {
		err := parseTunnelReply([]byte(tt.line))
		if !errors.Is(err, tt.wantErr) || (err != nil && !strings.Contains(err.Error(), tt.says)) {
			t.Errorf("parseTunnelReply(%q) = %v; want %v saying %q", tt.line, err, tt.wantErr, tt.says)
		}
	}
	long := tunnelError(strings.Repeat("x\n", maxTunnelLine))
	if len(long) > maxTunnelLine || bytes.Count(long, []byte("\n")) != 1 || !bytes.HasSuffix(long, []byte("\n")) {
		t.Errorf("tunnelError of a long reason: %d bytes, %d newlines", len(long), bytes.Count(long, []byte("\n")))
	}
}

// FuzzTunnelLines: request and reply parsing never panic; a request is accepted only
// as one of the two kinds, and a refusal's reason prints without control characters.
func FuzzTunnelLines(f *testing.F) {
	f.Add([]byte("peerlink-tunnel/1 connect"))
	f.Add([]byte("peerlink-tunnel/1 check"))
	f.Add([]byte("error \x1b]0;title\x07"))
	f.Add([]byte("ok"))
	f.Fuzz(func(t *testing.T, line []byte) {
		if kind, err := parseTunnelRequest(line); err == nil && string(line) != tunnelProto+" "+kind {
			t.Fatalf("accepted request %q as %q", line, kind)
		}
		if err := parseTunnelReply(line); err != nil {
			if _, why, ok := strings.Cut(err.Error(), ": "); ok && strings.ContainsAny(why, "\x1b\x07\r\n") && errors.Is(err, errTunnelRefused) {
				t.Fatalf("refusal %q keeps control characters", why)
			}
		} else if string(line) != "ok" {
			t.Fatalf("reply %q taken as ok", line)
		}
	})
}
