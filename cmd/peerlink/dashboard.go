package main

import (
	"bytes"
	"embed"
	"encoding/json"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// webFS holds the dashboards' pages: plain HTML, CSS and JavaScript, nothing fetched
// from elsewhere, so a dashboard works offline and loads at once.
//
//go:embed web
var webFS embed.FS

// webAssets is webFS without its web/ prefix.
var webAssets = func() fs.FS {
	sub, err := fs.Sub(webFS, "web")
	if err != nil {
		panic(err)
	}
	return sub
}()

// servePage serves one embedded page at / and the shared assets beside it.
func servePage(mux *http.ServeMux, page string) {
	files := http.FileServerFS(webAssets)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFileFS(w, r, webAssets, page)
	})
	for _, asset := range []string{"dashboard.css", "dashboard.js", "agent.js", "serve.js"} {
		mux.Handle("GET /"+asset, files)
	}
}

// guard wraps a dashboard's handler against other web pages: every response forbids
// framing and foreign scripts, a Host that is a DNS name other than localhost is refused
// (a DNS-rebinding page would otherwise be same-origin with the dashboard), and a
// request that changes something must come from the dashboard itself.
func guard(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Referrer-Policy", "no-referrer")
		if !hostAllowed(r.Host) {
			http.Error(w, "peerlink: this dashboard answers only to an IP address or localhost in the Host header", http.StatusMisdirectedRequest)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if reason := crossOrigin(r); reason != "" {
				writeJSON(w, http.StatusForbidden, map[string]string{"error": "cross-origin request refused: " + reason})
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// hostAllowed reports whether a Host header names an IP address or localhost.
func hostAllowed(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	return host == "localhost" || strings.HasSuffix(host, ".localhost")
}

// crossOrigin says why r did not come from a page of this server, or "" when it did.
// Browsers send Sec-Fetch-Site, and Origin on every POST; a client that sends neither
// (curl, a script) is no web page and may go ahead.
func crossOrigin(r *http.Request) string {
	switch site := r.Header.Get("Sec-Fetch-Site"); site {
	case "", "same-origin", "none":
	default:
		return "Sec-Fetch-Site is " + site
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return ""
	}
	if origin == "null" {
		return "Origin is null"
	}
	rest, ok := strings.CutPrefix(origin, "http://")
	if !ok {
		rest, ok = strings.CutPrefix(origin, "https://")
	}
	if !ok || !strings.EqualFold(rest, r.Host) {
		return "Origin " + origin + " is not " + r.Host
	}
	return ""
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// broadcaster wakes every waiter when something changes.
type broadcaster struct {
	mu sync.Mutex
	ch chan struct{}
}

// changed returns a channel closed at the next change.
func (b *broadcaster) changed() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

// notify wakes the waiters.
func (b *broadcaster) notify() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
		b.ch = nil
	}
}

// sseInterval is how often a stream sends the state when nothing announced a change:
// counters, rates and latencies move all the time.
const sseInterval = time.Second

// serveEvents streams snapshot() as server-sent events named event, at once, on every
// change and every sseInterval; an unchanged state is not sent again, only a comment
// now and then to keep proxies from closing the stream. It returns when the client goes
// or done closes.
func serveEvents(w http.ResponseWriter, r *http.Request, event string, snapshot func() any, b *broadcaster, done <-chan struct{}) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	tick := time.NewTicker(sseInterval)
	defer tick.Stop()
	var last []byte
	quiet := 0
	for {
		changed := b.changed()
		data, err := json.Marshal(snapshot())
		if err != nil {
			return
		}
		switch {
		case !bytes.Equal(data, last):
			if _, err := w.Write([]byte("event: " + event + "\ndata: " + string(data) + "\n\n")); err != nil {
				return
			}
			last, quiet = data, 0
		case quiet >= 15:
			if _, err := w.Write([]byte(": idle\n\n")); err != nil {
				return
			}
			quiet = 0
		default:
			quiet++
		}
		fl.Flush()
		select {
		case <-r.Context().Done():
			return
		case <-done:
			return
		case <-changed:
		case <-tick.C:
		}
	}
}
