package signal

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"
)

// ErrProxy is returned (wrapped) by Dial when the HTTP proxy does not open a tunnel to
// the server: a refusal, a failed proxy authentication, or an unsupported proxy.
var ErrProxy = errors.New("signal: proxy")

// EnvironmentProxy is the default of Options.Proxy, http.ProxyFromEnvironment:
// HTTPS_PROXY for wss, HTTP_PROXY for ws, and NO_PROXY. Loopback addresses are never
// proxied, and Go reads the environment once per process.
func EnvironmentProxy(req *http.Request) (*url.URL, error) {
	return http.ProxyFromEnvironment(req)
}

// DirectOnly is an Options.Proxy that never uses a proxy.
func DirectOnly(*http.Request) (*url.URL, error) { return nil, nil }

// proxyFor returns the proxy to reach the server at u (ws or wss) through, or nil.
func proxyFor(o *Options, u *url.URL) (*url.URL, error) {
	pick := o.Proxy
	if pick == nil {
		pick = EnvironmentProxy
	}
	scheme := "http"
	if u.Scheme == "wss" {
		scheme = "https"
	}
	req := &http.Request{Method: http.MethodGet, URL: &url.URL{Scheme: scheme, Host: u.Host, Path: "/"}, Host: u.Host, Header: http.Header{}}
	p, err := pick(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrProxy, err)
	}
	if p == nil {
		return nil, nil
	}
	if p.Scheme != "http" {
		return nil, fmt.Errorf("%w %s: scheme %q is not supported (use an http:// proxy, which tunnels with CONNECT)", ErrProxy, p.Redacted(), p.Scheme)
	}
	return p, nil
}

// dialConnect opens a tunnel to addr through an HTTP proxy with CONNECT, authenticating
// with the proxy URL's user info (Basic). ws and wss both tunnel: a proxy forwarding a
// plain-HTTP request would not pass the WebSocket upgrade on reliably.
func dialConnect(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), proxy *url.URL, addr string) (net.Conn, error) {
	paddr := proxy.Host
	if proxy.Port() == "" {
		paddr = net.JoinHostPort(proxy.Hostname(), "80")
	}
	conn, err := dial(ctx, "tcp", paddr)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrProxy, proxy.Redacted(), err)
	}
	// The handshake obeys ctx; the tunnel afterwards has no deadline.
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Opaque: addr}, Host: addr, Header: http.Header{}}
	req.Header.Set("User-Agent", "peerlink")
	if u := proxy.User; u != nil {
		pw, _ := u.Password()
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)))
	}
	fail := func(err error) (net.Conn, error) {
		conn.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("%w %s: CONNECT %s: %w", ErrProxy, proxy.Redacted(), addr, err)
	}
	if err := req.Write(conn); err != nil {
		return fail(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return fail(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fail(errors.New(resp.Status))
	}
	if !stop() {
		return fail(ctx.Err())
	}
	conn.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		return &bufferedConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

// bufferedConn is a tunnel whose first bytes the proxy sent along with its answer.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }
