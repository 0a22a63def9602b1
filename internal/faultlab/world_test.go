package faultlab

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
	"peerlink/relay"
	"peerlink/session"
	"peerlink/signal"
	"peerlink/stun"
)

// world is a kernel lab with peerlink's servers on its public server: STUN in this
// process, a rendezvous server in this process that can be restarted on its port, and
// the real relay binary, restarted by killing it and starting it again on its ports.
type world struct {
	l     *netlab.Lab
	stun  []string
	rv    *rendezvous
	relay *relayProc // nil when the world has no relay
}

func startWorld(t *testing.T, withRelay bool, sites ...netlab.SiteConfig) *world {
	t.Helper()
	netlabtest.Need(t)
	l := netlabtest.Start(t, netlab.Config{Sites: sites})
	ip1, ip2 := l.Server.IPs[0], l.Server.IPs[1]
	s, err := stun.Listen(context.Background(), stun.Config{Listen: netip.AddrPortFrom(ip1, 3478).String(), AltIP: ip2, AltPort: 3479, Net: l.Server, RateLimit: stun.RateLimit{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(context.Background())
	t.Cleanup(func() { s.Close() })
	w := &world{l: l, stun: []string{netip.AddrPortFrom(ip1, 3478).String()}}
	w.rv = startRendezvous(t, l.Server, netip.AddrPortFrom(ip2, 443), signal.Config{})
	if withRelay {
		w.relay = startRelay(t, l.Server, netip.AddrPortFrom(ip1, 3600))
	}
	return w
}

// rendezvous is an in-process rendezvous server on a lab host that can be stopped and
// started again on the same address.
type rendezvous struct {
	t    *testing.T
	host *netlab.Host
	addr netip.AddrPort
	cfg  signal.Config

	mu  sync.Mutex
	srv *signal.Server
	hs  *http.Server
}

func startRendezvous(t *testing.T, h *netlab.Host, addr netip.AddrPort, cfg signal.Config) *rendezvous {
	t.Helper()
	r := &rendezvous{t: t, host: h, addr: addr, cfg: cfg}
	if err := r.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.stop)
	return r
}

func (r *rendezvous) URL() string { return "ws://" + r.addr.String() }

func (r *rendezvous) start() error {
	srv, err := signal.NewServer(r.cfg)
	if err != nil {
		return err
	}
	var ln net.Listener
	// The old listener's port is free at once (Go listens with SO_REUSEADDR); retry
	// briefly all the same.
	for deadline := time.Now().Add(5 * time.Second); ; {
		ln, err = r.host.Listen(context.Background(), "tcp", r.addr.String())
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			srv.Close()
			return fmt.Errorf("rendezvous listen %s: %w", r.addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	hs := &http.Server{Handler: srv}
	go hs.Serve(ln)
	r.mu.Lock()
	r.srv, r.hs = srv, hs
	r.mu.Unlock()
	return nil
}

// stop closes the server: every client is disconnected and the port is closed.
func (r *rendezvous) stop() {
	r.mu.Lock()
	srv, hs := r.srv, r.hs
	r.srv, r.hs = nil, nil
	r.mu.Unlock()
	if srv == nil {
		return
	}
	hs.Close()
	srv.Close()
}

// restart stops the server and starts it again on the same address; it returns when
// the new one listens.
func (r *rendezvous) restart() {
	r.stop()
	if err := r.start(); err != nil {
		r.t.Error(err)
	}
}

// peerlinkBin builds the peerlink command once per test binary.
var peerlinkBin = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "faultlab-bin-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "peerlink")
	if out, err := exec.Command("go", "build", "-o", bin, "peerlink/cmd/peerlink").CombinedOutput(); err != nil {
		return "", fmt.Errorf("building peerlink: %v\n%s", err, out)
	}
	return bin, nil
})

// relayProc is `peerlink relay` running in a lab host's namespace.
type relayProc struct {
	t    *testing.T
	host *netlab.Host
	addr netip.AddrPort
	cfg  *connect.RelayConfig

	mu  sync.Mutex
	cmd *exec.Cmd
}

func startRelay(t *testing.T, h *netlab.Host, addr netip.AddrPort) *relayProc {
	t.Helper()
	r := &relayProc{t: t, host: h, addr: addr, cfg: &connect.RelayConfig{Server: addr.String(), Username: "peer", Password: "secret"}}
	if _, err := r.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.kill)
	return r
}

// start runs the relay and returns once it allocates: how long that took.
func (r *relayProc) start() (time.Duration, error) {
	bin, err := peerlinkBin()
	if err != nil {
		return 0, err
	}
	began := time.Now()
	cmd := r.host.Command(context.Background(), bin, "relay", "--listen", r.addr.String(), "--relay-ip", r.addr.Addr().String(), "--user", "peer:secret")
	if os.Getenv("PEERLINK_LAB_DEBUG") != "" {
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	r.mu.Lock()
	r.cmd = cmd
	r.mu.Unlock()
	for deadline := time.Now().Add(10 * time.Second); ; {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := relay.Dial(ctx, relay.ClientConfig{Server: r.cfg.Server, Username: r.cfg.Username, Password: r.cfg.Password, Listener: r.host})
		cancel()
		if err == nil {
			c.Close()
			return time.Since(began), nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("the lab's relay never allocated: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *relayProc) kill() {
	r.mu.Lock()
	cmd := r.cmd
	r.cmd = nil
	r.mu.Unlock()
	if cmd != nil {
		cmd.Process.Kill()
		cmd.Wait()
	}
}

// restart kills the relay (every allocation goes with it) and starts it again on the
// same ports; it returns how long until the new one allocated.
func (r *relayProc) restart() time.Duration {
	r.kill()
	d, err := r.start()
	if err != nil {
		r.t.Error(err)
	}
	return d
}

// node is a lab peer: connect's Node, its identity and rendezvous client.
type node struct {
	*connect.Node
	id   *identity.Identity
	sig  *signal.Client
	host *netlab.Host
}

// startNode starts a node for id on h, on the rendezvous server at url; relay may be
// nil. The node and its client close when the test ends.
func startNode(t *testing.T, ctx context.Context, h *netlab.Host, id *identity.Identity, url string, stunSrv []string, rc *connect.RelayConfig) (*node, error) {
	sc, err := signal.Dial(ctx, url, id, &signal.Options{DialContext: h.DialContext})
	if err != nil {
		return nil, fmt.Errorf("%s: signaling: %w", h.Name, err)
	}
	t.Cleanup(func() { sc.Close() })
	n, err := connect.Start(ctx, connect.Config{Identity: id, Signal: sc, STUN: stunSrv, Relay: rc, Net: h, DialContext: h.DialContext,
		LocalIPs: func() ([]netip.Addr, error) { return h.IPs, nil }})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	t.Cleanup(func() { n.Close() })
	if rc != nil {
		if err := n.WaitRelay(ctx); err != nil {
			return nil, fmt.Errorf("%s: relay: %w", h.Name, err)
		}
	}
	return &node{Node: n, id: id, sig: sc, host: h}, nil
}

// nodes starts one node on each named site, in parallel.
func (w *world) nodes(t *testing.T, names ...string) map[string]*node {
	t.Helper()
	var rc *connect.RelayConfig
	if w.relay != nil {
		rc = w.relay.cfg
	}
	out := map[string]*node{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, name := range names {
		wg.Go(func() {
			id, err := identity.Generate()
			if err != nil {
				t.Error(err)
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			n, err := startNode(t, ctx, w.l.Site(name).Host(), id, w.rv.URL(), w.stun, rc)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			out[name] = n
			mu.Unlock()
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return out
}

// connectPair connects a to b within timeout and returns both ends.
func connectPair(ctx context.Context, a, b *node, timeout time.Duration) (*connect.Conn, *connect.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	accepted := make(chan *connect.Conn, 1)
	go func() {
		defer close(accepted)
		for {
			c, err := b.Accept(ctx)
			if err != nil {
				return
			}
			if c.Peer() == a.NodeID() {
				accepted <- c
				return
			}
			c.Close()
		}
	}()
	ca, err := a.Connect(ctx, b.NodeID(), connect.Options{Timeout: timeout})
	if err != nil {
		cancel()
		<-accepted
		return nil, nil, err
	}
	cb := <-accepted
	if cb == nil {
		ca.Close()
		return nil, nil, errors.New("the responder never accepted")
	}
	return ca, cb, nil
}

// pair connects a to b, waits for method on both ends and starts a session on them;
// everything closes when the test ends.
func pair(t *testing.T, a, b *node, method connect.Method) (*session.Session, *session.Session) {
	t.Helper()
	ca, cb, err := connectPair(context.Background(), a, b, 15*time.Second)
	if err != nil {
		t.Fatalf("%s → %s: %v", a.host.Name, b.host.Name, err)
	}
	t.Cleanup(func() { ca.Close(); cb.Close() })
	for _, c := range []*connect.Conn{ca, cb} {
		for deadline := time.Now().Add(10 * time.Second); c.Method() != method; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s → %s: method %v, want %v", a.host.Name, b.host.Name, c.Method(), method)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var sb *session.Session
	var errB error
	var wg sync.WaitGroup
	wg.Go(func() { sb, errB = session.New(ctx, cb, session.Config{Identity: b.id}) })
	sa, err := session.New(ctx, ca, session.Config{Identity: a.id})
	wg.Wait()
	if err != nil || errB != nil {
		if sa != nil {
			sa.Close()
		}
		if sb != nil {
			sb.Close()
		}
		t.Fatalf("sessions: client %v, server %v", err, errB)
	}
	t.Cleanup(func() { sa.Close(); sb.Close() })
	return sa, sb
}

// flow is a paced stream transfer from one session to another, running in the
// background; the receiver's Meter shows its stalls.
type flow struct {
	name  string
	size  int64
	meter *Meter
	start time.Time
	done  chan error // the result, once: nil when every byte arrived intact

	stopOnce sync.Once
	stopped  chan struct{}
}

// stop makes the sender finish early: it closes the stream after what it has sent,
// which must still arrive intact.
func (f *flow) stop() { f.stopOnce.Do(func() { close(f.stopped) }) }

// startFlow sends size bytes (fewer if stopped) of a seeded pattern from a to b at rate
// bytes per second and checks they arrive intact.
func startFlow(name string, a, b *session.Session, size, rate int64, seed uint64) *flow {
	f := &flow{name: name, size: size, meter: &Meter{}, start: time.Now(), done: make(chan error, 1), stopped: make(chan struct{})}
	go func() { f.done <- f.run(a, b, rate, seed) }()
	return f
}

func (f *flow) run(a, b *session.Session, rate int64, seed uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	type result struct {
		sum [32]byte
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		st, err := b.AcceptStream(ctx)
		if err != nil {
			got <- result{err: err}
			return
		}
		h := sha256.New()
		n, err := io.Copy(io.MultiWriter(h, f.meter), st)
		r := result{n: n, err: err}
		copy(r.sum[:], h.Sum(nil))
		got <- r
	}()
	st, err := a.OpenStream(ctx)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	h := sha256.New()
	buf := make([]byte, 16<<10)
	var sent int64
sending:
	for sent < f.size {
		select {
		case <-f.stopped:
			break sending
		default:
		}
		k := min(int64(len(buf)), f.size-sent)
		src.Read(buf[:k])
		h.Write(buf[:k])
		if _, err := st.Write(buf[:k]); err != nil {
			st.Reset()
			<-got
			return fmt.Errorf("write after %d bytes: %w", sent, err)
		}
		sent += k
		// Paced: the transfer must still run when the fault comes and after it.
		if ahead := time.Duration(float64(sent)/float64(rate)*float64(time.Second)) - time.Since(f.start); ahead > 0 {
			time.Sleep(ahead)
		}
	}
	if err := st.Close(); err != nil {
		return err
	}
	r := <-got
	switch {
	case r.err != nil:
		return fmt.Errorf("read after %d bytes: %w", r.n, r.err)
	case r.n != sent || r.sum != [32]byte(h.Sum(nil)):
		return fmt.Errorf("received %d bytes, sha256 %x; sent %d, sha256 %x", r.n, r.sum, sent, h.Sum(nil))
	}
	return nil
}

// wait returns the flow's result, or an error when it has not ended within d.
func (f *flow) wait(d time.Duration) error {
	select {
	case err := <-f.done:
		return err
	case <-time.After(d):
		return fmt.Errorf("%s: not done after %v (%d of %d bytes)", f.name, d, f.meter.Bytes(), f.size)
	}
}
