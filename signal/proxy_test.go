package signal_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// tinyproxy runs Debian's tinyproxy on a loopback port with Basic authentication and
// returns its address.
func tinyproxy(t *testing.T, user, pass string) string {
	t.Helper()
	bin, err := exec.LookPath("tinyproxy")
	if err != nil {
		// make test installs it when root: missing there is a failure, not a skip.
		if os.Geteuid() == 0 {
			t.Fatalf("running as root but tinyproxy is missing (apt-get install -y tinyproxy): %v", err)
		}
		t.Skip("tinyproxy is not installed (apt-get install -y tinyproxy; make test installs it as root)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	conf := filepath.Join(t.TempDir(), "tinyproxy.conf")
	// No ConnectPort lines: CONNECT to any port, as a corporate proxy allowing 443
	// would to a rendezvous server on 443.
	cfg := fmt.Sprintf("Port %s\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nAllow 127.0.0.1\nBasicAuth %s %s\nLogLevel Warning\n",
		port, user, pass)
	if os.Geteuid() == 0 {
		cfg += "User nobody\nGroup nogroup\n"
	}
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-d", "-c", conf)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("tinyproxy:\n%s", out.Bytes())
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("tinyproxy did not listen on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// firewall is a DialContext that lets connections out only to allowed, as a host whose
// one way out is its proxy; it records what was dialled.
type firewall struct {
	allowed string
	dialled []string
}

func (f *firewall) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	f.dialled = append(f.dialled, addr)
	if addr != f.allowed {
		return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// TestDialThroughProxy: a client whose only way out is an HTTP proxy reaches the
// rendezvous server through it with CONNECT and Basic authentication, over ws and wss,
// and relays to a peer; without the proxy, or with bad credentials, it cannot.
func TestDialThroughProxy(t *testing.T) {
	proxy := tinyproxy(t, "peer", "s3cret")
	for _, withTLS := range []bool{false, true} {
		srv := signaltest.Start(t, signal.Config{}, withTLS)
		name := strings.SplitN(srv.URL, ":", 2)[0]
		proxyURL := func(userinfo string) func(*http.Request) (*url.URL, error) {
			return http.ProxyURL(&url.URL{Scheme: "http", User: url.UserPassword(strings.Split(userinfo, ":")[0], strings.Split(userinfo, ":")[1]), Host: proxy})
		}
		tests := []struct {
			name    string
			proxy   func(*http.Request) (*url.URL, error)
			wantErr string // "" for success; "auth" for a proxy's 401 or 407
		}{
			{"direct, firewalled", signal.DirectOnly, "connection refused"},
			{"through the proxy", proxyURL("peer:s3cret"), ""},
			{"wrong password", proxyURL("peer:guess"), "auth"},
			{"no credentials", http.ProxyURL(&url.URL{Scheme: "http", Host: proxy}), "auth"},
		}
		for _, tt := range tests {
			t.Run(name+"/"+tt.name, func(t *testing.T) {
				fw := &firewall{allowed: proxy}
				id, _ := identity.Generate()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				c, err := signal.Dial(ctx, srv.URL, id, &signal.Options{TLSConfig: srv.TLS, DialContext: fw.DialContext, Proxy: tt.proxy})
				if tt.wantErr != "" {
					if err == nil {
						c.Close()
						t.Fatal("dial worked")
					}
					if tt.wantErr == "auth" {
						if !errors.Is(err, signal.ErrProxy) || !strings.Contains(err.Error(), " 401 ") && !strings.Contains(err.Error(), " 407 ") {
							t.Fatalf("dial: %v, want ErrProxy with 401 or 407", err)
						}
					} else if !strings.Contains(err.Error(), tt.wantErr) {
						t.Fatalf("dial: %v, want %q", err, tt.wantErr)
					}
					return
				}
				if err != nil {
					t.Fatalf("dial through the proxy: %v", err)
				}
				defer c.Close()
				if len(fw.dialled) != 1 || fw.dialled[0] != proxy {
					t.Fatalf("dialled %v, want only the proxy %s", fw.dialled, proxy)
				}
				peer := srv.Dial(t, nil)
				ra, rb := relayPair(t, c, peer, "")
				pingPong(t, ra, rb, 10)
			})
		}
	}
}

// TestProxyFromEnvironment: with no Proxy option the client follows HTTP_PROXY,
// HTTPS_PROXY and NO_PROXY. Go reads them once per process, so this runs in a child
// process of the test binary.
func TestProxyFromEnvironment(t *testing.T) {
	if os.Getenv("PEERLINK_PROXY_CHILD") != "" {
		proxyChild(t)
		return
	}
	// Loopback servers are never proxied, so the server listens on another address of
	// this host.
	ip := nonLoopbackIP()
	if ip == "" {
		t.Skip("no non-loopback IPv4 address to serve on")
	}
	proxy := tinyproxy(t, "env", "pw")
	srv, err := signal.NewServer(signal.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() { cancel(); <-done; srv.Close() }()

	cmd := exec.Command(os.Args[0], "-test.run=^TestProxyFromEnvironment$", "-test.v")
	cmd.Env = append(os.Environ(),
		"PEERLINK_PROXY_CHILD=1",
		"PEERLINK_PROXY_SERVER=ws://"+ln.Addr().String()+"/",
		"PEERLINK_PROXY_ADDR="+proxy,
		"HTTP_PROXY=http://env:pw@"+proxy,
		"HTTPS_PROXY=http://env:pw@"+proxy,
		"NO_PROXY=skip.example",
	)
	out, err := cmd.CombinedOutput()
	t.Logf("child:\n%s", out)
	if err != nil {
		t.Fatalf("child: %v", err)
	}
}

func proxyChild(t *testing.T) {
	server, proxy := os.Getenv("PEERLINK_PROXY_SERVER"), os.Getenv("PEERLINK_PROXY_ADDR")
	id, _ := identity.Generate()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fw := &firewall{allowed: proxy}
	c, err := signal.Dial(ctx, server, id, &signal.Options{DialContext: fw.DialContext})
	if err != nil {
		t.Fatalf("dial with HTTP_PROXY set: %v (dialled %v)", err, fw.dialled)
	}
	c.Close()
	if len(fw.dialled) != 1 || fw.dialled[0] != proxy {
		t.Fatalf("dialled %v, want the proxy %s", fw.dialled, proxy)
	}
	// NO_PROXY: straight to the server, which the firewall refuses.
	fw = &firewall{allowed: proxy}
	if _, err := signal.Dial(ctx, "ws://skip.example:1/", id, &signal.Options{DialContext: fw.DialContext}); err == nil {
		t.Fatal("dial to a NO_PROXY host worked through the firewall")
	}
	if len(fw.dialled) != 1 || fw.dialled[0] != "skip.example:1" {
		t.Fatalf("NO_PROXY host: dialled %v, want skip.example:1 directly", fw.dialled)
	}
}

func nonLoopbackIP() string {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() && !n.IP.IsLinkLocalUnicast() {
			return n.IP.String()
		}
	}
	return ""
}
