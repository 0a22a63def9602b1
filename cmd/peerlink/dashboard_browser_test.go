package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// browser starts headless Chromium for one test, in the background: the returned
// function waits for it. Without Chromium the test skips when not root and fails as
// root, where 'make test' installs it.
func browser(t *testing.T) func() context.Context {
	t.Helper()
	var path string
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		if os.Geteuid() != 0 {
			t.Skip("the dashboard's browser test needs Chromium (apt-get install chromium; make test installs it as root)")
		}
		t.Fatal("running as root, but Chromium is missing (apt-get install -y chromium, as make test does)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(path), chromedp.WindowSize(1280, 900))
	if os.Geteuid() == 0 {
		opts = append(opts, chromedp.NoSandbox) // Chromium refuses to run as root with its sandbox
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	started := make(chan error, 1)
	// The first action starts the browser, which lives as long as ctx.
	go func() { started <- chromedp.Do(ctx) }()
	t.Cleanup(func() {
		<-started // the start ends once cancelled, if not before
		cancel()
		cancelAlloc()
	})
	var err error
	var once sync.Once
	return func() context.Context {
		t.Helper()
		once.Do(func() {
			err = <-started
			started <- err // for the cleanup
		})
		if err != nil {
			t.Fatalf("starting Chromium (%s): %v", path, err)
		}
		return ctx
	}
}

// artifacts is where the browser tests leave their screenshots: $PEERLINK_ARTIFACTS, by
// default peerlink-artifacts in the temporary directory.
func artifacts(t *testing.T) string {
	dir := os.Getenv("PEERLINK_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "peerlink-artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Errorf("screenshot %s: %v", name, err)
		return
	}
	path := filepath.Join(artifacts(t), name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}

// waitJS waits up to d for a JavaScript expression to be true.
func waitJS(t *testing.T, ctx context.Context, what, expr string, d time.Duration) {
	t.Helper()
	if _, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(d))); err != nil {
		body, _ := chromedp.Run(ctx, chromedp.Text("main"))
		t.Fatalf("%s: not within %v (%s): %v\npage:\n%s", what, d, expr, err, body)
	}
}

func text(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(sel))
	if err != nil {
		t.Fatalf("text of %s: %v", sel, err)
	}
	return strings.TrimSpace(s)
}

// TestDashboardsInBrowser runs 'peerlink serve' (rendezvous, STUN, relay) and two
// agents on loopback and drives both dashboards in headless Chromium: the agent's shows
// its NodeID and NAT profile, connects to the other agent through its form and lists it
// with its method and round trip, and shows an error for a bad NodeID; the server's
// lists both agents as connected peers and the relay's sessions.
func TestDashboardsInBrowser(t *testing.T) {
	started := browser(t) // while the servers and agents start
	srv := startServe(t, []string{"PEERLINK_TURN_SECRET=s3cret"}, loopbackServe("--metrics", "127.0.0.1:0")...)
	server, stunAddr := srv.lines["rendezvous"], srv.stunAddr(t)
	if srv.lines["dashboard"] == "" {
		t.Fatalf("serve printed no dashboard address: %v", srv.lines)
	}
	a := startAgent(t, "--server", server, "--stun", stunAddr, "--http", "127.0.0.1:0")
	b := startAgent(t, "--server", server, "--stun", stunAddr)
	ctx := started()

	t.Run("agent", func(t *testing.T) {
		tctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := chromedp.Do(tctx, chromedp.Navigate(a.ready.HTTP)); err != nil {
			t.Fatal(err)
		}
		waitJS(t, tctx, "live status", `document.getElementById("node").textContent.length > 40 && document.getElementById("live").textContent.includes("live")`, 5*time.Second)
		if got := text(t, tctx, "#node"); got != a.node {
			t.Errorf("NodeID on the page: %q, want %q", got, a.node)
		}
		if got := text(t, tctx, "#mapping"); !strings.Contains(got, "endpoint-independent") {
			t.Errorf("mapping on the page: %q", got)
		}
		if got := text(t, tctx, "#public"); !strings.HasPrefix(got, "127.0.0.1:") {
			t.Errorf("public address on the page: %q", got)
		}

		// A bad NodeID: the error is shown, nothing is listed.
		if err := chromedp.Do(tctx, chromedp.SendKeys("#connect-node", "not-a-node-id"), chromedp.Click("#connect-button")); err != nil {
			t.Fatal(err)
		}
		waitJS(t, tctx, "error shown", `document.getElementById("connect-result").className === "error"`, 5*time.Second)
		if got := text(t, tctx, "#connect-result"); !strings.Contains(got, "is not a NodeID") {
			t.Errorf("error on the page: %q", got)
		}

		if _, err := chromedp.Run(tctx, chromedp.Evaluate[bool](`(document.getElementById("connect-node").value = "") === ""`)); err != nil {
			t.Fatal(err)
		}
		if err := chromedp.Do(tctx, chromedp.SendKeys("#connect-node", b.node), chromedp.Click("#connect-button")); err != nil {
			t.Fatal(err)
		}
		row := `document.querySelector('#peers td[data-peer="` + b.node + `"]')`
		waitJS(t, tctx, "peer listed", row+` !== null`, 10*time.Second)
		waitJS(t, tctx, "round trip shown", row+`.parentElement.children[4].textContent.includes("ms")`, 5*time.Second)
		// On loopback the relayed first path moves to direct at once.
		waitJS(t, tctx, "direct path shown", row+`.parentElement.children[2].textContent === "direct"`, 5*time.Second)
		cells, err := chromedp.Run(tctx, chromedp.Evaluate[[]string](`Array.from(`+row+`.parentElement.children, (td) => td.textContent)`))
		if err != nil {
			t.Fatal(err)
		}
		if len(cells) != 11 || cells[1] != "outgoing" || cells[2] != "direct" || !strings.HasSuffix(cells[6], "%") {
			t.Errorf("peer's row: %q, want outgoing, direct, with loss", cells)
		}
		if got := text(t, tctx, "#connect-result"); !strings.Contains(got, "connected to") {
			t.Errorf("result line: %q", got)
		}
		screenshot(t, tctx, "agent-dashboard.png")
	})

	t.Run("serve", func(t *testing.T) {
		tctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := chromedp.Do(tctx, chromedp.Navigate(srv.lines["dashboard"])); err != nil {
			t.Fatal(err)
		}
		for _, node := range []string{a.node, b.node} {
			waitJS(t, tctx, "agent listed as a connected peer", `document.querySelector('#peers td[data-peer="`+node+`"]') !== null`, 5*time.Second)
		}
		waitJS(t, tctx, "relay sessions listed", `document.querySelectorAll("#sessions td.num").length >= 2`, 5*time.Second)
		waitJS(t, tctx, "registered relay listed", `document.querySelectorAll("#relays tr td.num").length >= 2`, 5*time.Second)
		if got := text(t, tctx, "#stun"); !strings.Contains(got, "/s") {
			t.Errorf("STUN card: %q", got)
		}
		screenshot(t, tctx, "serve-dashboard.png")
	})
}
