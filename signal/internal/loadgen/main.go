// Command loadgen measures a rendezvous server: how many authenticated clients it holds,
// the memory each idle one costs, and how many signed messages per second it routes.
//
// By default it starts the server as a child process (itself, with -role server), so the
// server's memory and CPU are measured apart from the load generator's:
//
//	go run ./signal/internal/loadgen -clients 10000 -rate 20000 -duration 10s
//
// Clients connect over real loopback WebSockets, authenticate by signing the server's
// challenge, and send iceCandidate messages signed in advance (signing is each real
// client's own CPU, not the server's) to other clients in a ring. Receivers verify the
// signature of one message in -verify-every. With -url it loads an external server
// instead (memory figures are then not available).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"

	"peerlink/identity"
	psignal "peerlink/signal"
)

func main() {
	role := flag.String("role", "load", "load (generate load) or server (be the server under test)")
	listen := flag.String("listen", "127.0.0.1:0", "server role: address to listen on")
	skipVerify := flag.Bool("server-skip-verify", false, "server does not verify routed messages' signatures (receivers always may)")
	url := flag.String("url", "", "load an external server at this ws:// URL instead of starting one")
	clients := flag.Int("clients", 10000, "concurrent authenticated clients")
	rate := flag.Int("rate", 20000, "messages per second to offer (0: as fast as possible)")
	duration := flag.Duration("duration", 10*time.Second, "length of the routing phase")
	dialers := flag.Int("dialers", 64, "concurrent connection attempts")
	senders := flag.Int("senders", 32, "sending goroutines")
	verifyEvery := flag.Int("verify-every", 100, "receivers verify the signature of one message in N (0: none)")
	idle := flag.Duration("idle", 3*time.Second, "settle time before measuring idle memory")
	cpuProfile := flag.String("server-cpuprofile", "", "server role: write a CPU profile of the routing phase here")
	serverLog := flag.Bool("server-log", false, "server logs connection events (debug level) to stderr")
	flag.BoolVar(&jsonOut, "json", false, "print the figures as JSON on stdout (the text goes to stderr)")
	flag.Parse()
	if jsonOut {
		out = os.Stderr
	}
	raiseFDLimit()
	if *role == "server" {
		serve(*listen, *skipVerify, *cpuProfile, *serverLog)
		return
	}
	if err := load(*url, *clients, *rate, *duration, *dialers, *senders, *verifyEvery, *idle, *skipVerify, *cpuProfile, *serverLog); err != nil {
		log.Fatal(err)
	}
}

// raiseFDLimit lifts RLIMIT_NOFILE as far as allowed: ten thousand clients need ten
// thousand descriptors on each side.
func raiseFDLimit() {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return
	}
	want := uint64(1 << 20)
	if l.Max < want {
		// Only root may raise the hard limit; try, then settle for the hard limit.
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: want, Max: want}) == nil {
			return
		}
		want = l.Max
	}
	l.Cur = want
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
}

var (
	jsonOut bool
	out     io.Writer = os.Stdout // the text report; stderr under -json
)

// jsonReport is what -json prints on stdout. Memory and CPU figures are zero with -url.
type jsonReport struct {
	Clients           int     `json:"clients"`
	Held              int64   `json:"held"` // authenticated clients the server held when idle
	ConnectSeconds    float64 `json:"connectSeconds"`
	RSSPerClient      float64 `json:"rssBytesPerClient"`
	HeapPerClient     float64 `json:"heapBytesPerClient"`
	Sent              int64   `json:"sent"`
	Delivered         int64   `json:"delivered"`
	RouteSeconds      float64 `json:"routeSeconds"`
	DeliveredPerSec   float64 `json:"deliveredPerSec"`
	ServerCPUSeconds  float64 `json:"serverCPUSeconds"`
	RoutedPerCPUs     float64 `json:"routedPerCPUSecond"`
	StillConnected    int64   `json:"stillConnected"`
	VerifiedSignature int64   `json:"verifiedSignatures"`
	BadSignatures     int64   `json:"badSignatures"`
	Lost              int64   `json:"lost"`            // sent but not delivered
	ConnectionsLost   int64   `json:"connectionsLost"` // connections that ended during the run
}

// serverStats is what the server role reports on /loadgen/stats.
type serverStats struct {
	RSS        int64  `json:"rss"`
	HeapInuse  uint64 `json:"heapInuse"`
	Sys        uint64 `json:"sys"`
	Goroutines int    `json:"goroutines"`
	Conns      int64  `json:"conns"`
	Authed     int64  `json:"authed"`
	Routed     uint64 `json:"routed"`
	Errors     uint64 `json:"errors"`
	Abusive    uint64 `json:"abusive"`
	CPU        int64  `json:"cpuMicros"` // user+system CPU time of the process
}

func serve(listen string, skipVerify bool, cpuProfile string, verbose bool) {
	var logger *slog.Logger
	if verbose {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	srv, err := psignal.NewServer(psignal.Config{
		Logger:             logger,
		SkipSignatureCheck: skipVerify,
		// A server for ten thousand clients: the defaults otherwise.
		PingInterval: time.Minute,
	})
	if err != nil {
		log.Fatal(err)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/loadgen/stats", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Has("gc") {
			runtime.GC()
			debug.FreeOSMemory()
		}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		st := srv.Stats()
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		json.NewEncoder(w).Encode(serverStats{
			RSS: rss(), HeapInuse: ms.HeapInuse, Sys: ms.Sys, Goroutines: runtime.NumGoroutine(),
			Conns: st.Connections, Authed: st.Authenticated, Routed: st.Routed, Errors: st.Errors, Abusive: st.Abusive,
			CPU: ru.Utime.Nano()/1000 + ru.Stime.Nano()/1000,
		})
	})
	mux.HandleFunc("/loadgen/profile", func(w http.ResponseWriter, r *http.Request) {
		if cpuProfile == "" {
			return
		}
		if r.URL.Query().Has("stop") {
			pprof.StopCPUProfile()
			return
		}
		f, err := os.Create(cpuProfile)
		if err == nil {
			pprof.StartCPUProfile(f)
		}
	})
	mux.Handle("/", srv)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Printf("LISTEN %s\n", ln.Addr())
	hs := &http.Server{Handler: mux}
	go func() { <-ctx.Done(); hs.Close() }()
	hs.Serve(ln)
	srv.Close()
}

// rss reads the process's resident set size from /proc.
func rss() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n * 1024
		}
	}
	return 0
}

type loadClient struct {
	id     *identity.Identity
	ws     *websocket.Conn
	frames [][]byte
	wmu    sync.Mutex
}

type counters struct {
	acks, received, verified, badSig atomic.Int64
	lost                             atomic.Int64 // connections that ended during the run
	sample                           atomic.Int64
	mu                               sync.Mutex
	errs                             map[string]int
}

func (c *counters) addErr(code string) {
	c.mu.Lock()
	c.errs[code]++
	c.mu.Unlock()
}

func load(url string, n, rate int, duration time.Duration, dialers, senders, verifyEvery int, idle time.Duration, skipVerify bool, cpuProfile string, serverLog bool) error {
	var statsURL, profileURL string
	if url == "" {
		child, addr, err := startServer(skipVerify, cpuProfile, serverLog)
		if err != nil {
			return err
		}
		defer func() {
			child.Process.Signal(syscall.SIGTERM)
			child.Wait()
		}()
		url = "ws://" + addr + "/"
		statsURL = "http://" + addr + "/loadgen/stats"
		profileURL = "http://" + addr + "/loadgen/profile"
	}
	rep := jsonReport{Clients: n}
	fmt.Fprintf(out, "loadgen: %d clients, %d msg/s offered for %v, server %s (server verifies signatures: %v)\n", n, rate, duration, url, !skipVerify)
	base, _ := getStats(statsURL, true)

	// Identities first: key generation is the clients' cost, not the server's.
	cl := make([]*loadClient, n)
	for i := range cl {
		id, err := identity.Generate()
		if err != nil {
			return err
		}
		cl[i] = &loadClient{id: id}
	}

	cnt := &counters{errs: map[string]int{}}
	start := time.Now()
	var failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	work := make(chan int)
	for range dialers {
		wg.Go(func() {
			for i := range work {
				if err := cl[i].connect(url); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		})
	}
	for i := range cl {
		work <- i
	}
	close(work)
	wg.Wait()
	connectTime := time.Since(start)
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("%d of %d clients failed to connect (first: %v)", f, n, firstErr.Load())
	}
	rep.ConnectSeconds = connectTime.Seconds()
	fmt.Fprintf(out, "connect: %d clients authenticated in %v (%.0f/s)\n", n, connectTime.Round(time.Millisecond), float64(n)/connectTime.Seconds())

	var readers sync.WaitGroup
	for _, c := range cl {
		readers.Go(func() { c.read(cnt, verifyEvery) })
	}

	time.Sleep(idle)
	if statsURL != "" {
		st, err := getStats(statsURL, true)
		if err == nil {
			rep.Held = st.Authed
			rep.RSSPerClient = float64(st.RSS-base.RSS) / float64(n)
			rep.HeapPerClient = float64(int64(st.HeapInuse)-int64(base.HeapInuse)) / float64(n)
			fmt.Fprintf(out, "server idle: %d connections, %d goroutines, RSS %.1f MiB (+%.1f MiB), heap in use %.1f MiB (+%.1f MiB)\n",
				st.Authed, st.Goroutines, mib(st.RSS), mib(st.RSS-base.RSS), mib(int64(st.HeapInuse)), mib(int64(st.HeapInuse)-int64(base.HeapInuse)))
			fmt.Fprintf(out, "memory per idle client: %.1f KiB RSS, %.1f KiB Go heap\n",
				float64(st.RSS-base.RSS)/1024/float64(n), float64(int64(st.HeapInuse)-int64(base.HeapInuse))/1024/float64(n))
		}
	}

	// Pre-sign the routing phase's messages, spread over all cores.
	total := rate * int(duration/time.Second)
	if rate == 0 {
		total = 30 * n
	}
	per := (total + n - 1) / n
	signStart := time.Now()
	sw := make(chan int)
	for range runtime.NumCPU() {
		wg.Go(func() {
			for i := range sw {
				cl[i].presign(cl[(i+1)%n].id.NodeID(), per)
			}
		})
	}
	for i := range cl {
		sw <- i
	}
	close(sw)
	wg.Wait()
	fmt.Fprintf(out, "pre-signed %d messages in %v\n", per*n, time.Since(signStart).Round(time.Millisecond))

	before, _ := getStats(statsURL, false)
	if cpuProfile != "" && profileURL != "" {
		http.Get(profileURL)
	}
	recv0 := cnt.received.Load()
	routeStart := time.Now()
	var sent atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	// Senders take turns over clients; a global pacer hands out permits each millisecond.
	permits := make(chan struct{}, 4096)
	go func() {
		defer close(permits)
		if rate == 0 {
			for ctx.Err() == nil {
				permits <- struct{}{}
			}
			return
		}
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		issued := 0
		for ctx.Err() == nil {
			<-t.C
			due := int(float64(rate) * time.Since(routeStart).Seconds())
			for ; issued < due && ctx.Err() == nil; issued++ {
				select {
				case permits <- struct{}{}:
				case <-ctx.Done():
				}
			}
		}
	}()
	var next atomic.Int64
	for range senders {
		wg.Go(func() {
			for range permits {
				k := int(next.Add(1) - 1)
				c := cl[k%n]
				j := k / n
				if j >= len(c.frames) {
					return
				}
				c.wmu.Lock()
				err := c.ws.Write(context.Background(), websocket.MessageText, c.frames[j])
				c.wmu.Unlock()
				if err != nil {
					cnt.addErr("write: " + err.Error())
					continue
				}
				sent.Add(1)
			}
		})
	}
	wg.Wait()
	sendTime := time.Since(routeStart)
	// Let the last messages arrive: unpaced (-rate 0), the server may still be working
	// through a backlog, so wait as long as deliveries progress, and 5 s after the last.
	deadline := time.Now().Add(5 * time.Second)
	for last := cnt.received.Load(); last-recv0 < sent.Load() && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		if now := cnt.received.Load(); now > last {
			last, deadline = now, time.Now().Add(5*time.Second)
		}
	}
	elapsed := time.Since(routeStart)
	after, _ := getStats(statsURL, false)
	if cpuProfile != "" && profileURL != "" {
		http.Get(profileURL + "?stop")
	}
	received := cnt.received.Load() - recv0
	rep.Sent, rep.Delivered, rep.RouteSeconds = sent.Load(), received, elapsed.Seconds()
	rep.DeliveredPerSec = float64(received) / elapsed.Seconds()
	rep.VerifiedSignature, rep.BadSignatures = cnt.verified.Load(), cnt.badSig.Load()
	fmt.Fprintf(out, "routing: sent %d in %v, acknowledged %d, delivered %d (%.0f msg/s delivered over %v)\n",
		sent.Load(), sendTime.Round(time.Millisecond), cnt.acks.Load(), received, float64(received)/elapsed.Seconds(), elapsed.Round(time.Millisecond))
	fmt.Fprintf(out, "receivers verified %d signatures, %d bad\n", cnt.verified.Load(), cnt.badSig.Load())
	if statsURL != "" {
		cpu := float64(after.CPU-before.CPU) / 1e6
		rep.ServerCPUSeconds, rep.StillConnected = cpu, after.Authed
		if cpu > 0 {
			rep.RoutedPerCPUs = float64(after.Routed-before.Routed) / cpu
		}
		fmt.Fprintf(out, "server: routed %d, errors %d, CPU %.2f s over %.2f s (%.0f%% of one core, %.1f µs per message); %d clients still connected, %d closed for abuse\n",
			after.Routed-before.Routed, after.Errors-before.Errors, cpu, elapsed.Seconds(), 100*cpu/elapsed.Seconds(), cpu*1e6/float64(max(1, after.Routed-before.Routed)), after.Authed, after.Abusive)
	}
	if len(cnt.errs) > 0 {
		fmt.Fprintf(out, "errors: %v\n", cnt.errs)
	}
	rep.ConnectionsLost = cnt.lost.Load() // before the clients close below
	if l := rep.ConnectionsLost; l > 0 {
		fmt.Fprintf(out, "connections lost during the run: %d\n", l)
	}
	for _, c := range cl {
		c.ws.CloseNow()
	}
	readers.Wait()
	rep.Lost = sent.Load() - received
	if jsonOut {
		// Even when the run failed below: the figures say how far it got.
		if err := json.NewEncoder(os.Stdout).Encode(rep); err != nil {
			return err
		}
	}
	if received < sent.Load() || cnt.badSig.Load() > 0 {
		return fmt.Errorf("lost %d messages, %d bad signatures", sent.Load()-received, cnt.badSig.Load())
	}
	return nil
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func startServer(skipVerify bool, cpuProfile string, verbose bool) (*exec.Cmd, string, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	args := []string{"-role", "server", "-server-cpuprofile", cpuProfile}
	if skipVerify {
		args = append(args, "-server-skip-verify")
	}
	if verbose {
		args = append(args, "-server-log")
	}
	cmd := exec.Command(exe, args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "LISTEN ") {
		cmd.Process.Kill()
		return nil, "", fmt.Errorf("server child did not start: %q %v", line, err)
	}
	go io.Copy(io.Discard, out)
	return cmd, strings.TrimSpace(strings.TrimPrefix(line, "LISTEN ")), nil
}

func getStats(url string, gc bool) (serverStats, error) {
	var st serverStats
	if url == "" {
		return st, fmt.Errorf("no stats")
	}
	if gc {
		url += "?gc"
	}
	resp, err := http.Get(url)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

func (c *loadClient) connect(url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: []string{psignal.Subprotocol}})
	if err != nil {
		return err
	}
	_, b, err := ws.Read(ctx)
	if err != nil {
		return err
	}
	f, err := psignal.ParseFrame(b)
	if err != nil || f.Type != psignal.TypeChallenge {
		return fmt.Errorf("no challenge: %s", b)
	}
	var ch struct{ Nonce string }
	json.Unmarshal(f.Body, &ch)
	host := strings.TrimSuffix(strings.TrimPrefix(url, "ws://"), "/")
	node := c.id.NodeID()
	sig := c.id.Sign(psignal.AuthSigningInput(host, ch.Nonce, node))
	auth := fmt.Sprintf(`{"id":1,"auth":{"nodeID":%q,"host":%q,"signature":%q}}`, node, host, hex.EncodeToString(sig))
	if err := ws.Write(ctx, websocket.MessageText, []byte(auth)); err != nil {
		return err
	}
	if _, b, err = ws.Read(ctx); err != nil {
		return err
	}
	if !bytes.Contains(b, []byte(`"welcome"`)) {
		return fmt.Errorf("auth refused: %s", b)
	}
	c.ws = ws
	return nil
}

var candidate = psignal.Candidate{Type: psignal.CandidateSrflx, IP: netip.MustParseAddr("203.0.113.50"), Port: 40000,
	Priority: psignal.CandidatePriority(psignal.CandidateSrflx, 65535)}

func (c *loadClient) presign(to identity.NodeID, k int) {
	now := time.Now()
	c.frames = make([][]byte, k)
	for j := range c.frames {
		cand := candidate
		cand.Port += uint16(j)
		m := &psignal.Message{Type: psignal.TypeCandidate, To: to, Session: "load", Candidate: &cand}
		if err := m.Sign(c.id, now); err != nil {
			log.Fatal(err)
		}
		f, err := m.AppendFrame(nil, uint64(j+2))
		if err != nil {
			log.Fatal(err)
		}
		c.frames[j] = f
	}
}

func (c *loadClient) read(cnt *counters, verifyEvery int) {
	me := c.id.NodeID()
	for {
		_, b, err := c.ws.Read(context.Background())
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && websocket.CloseStatus(err) == -1 || websocket.CloseStatus(err) > 0 {
				if cnt.lost.Add(1) == 1 {
					log.Printf("first connection lost: %v", err)
				}
			}
			return
		}
		switch {
		case bytes.HasPrefix(b, []byte(`{"iceCandidate":`)):
			cnt.received.Add(1)
			if verifyEvery > 0 && cnt.sample.Add(1)%int64(verifyEvery) == 0 {
				f, err := psignal.ParseFrame(b)
				var m *psignal.Message
				if err == nil {
					m, err = psignal.DecodeMessage(f.Type, f.Body)
				}
				if err == nil {
					err = m.Verify(me, time.Now(), time.Minute)
				}
				if err != nil {
					cnt.badSig.Add(1)
				} else {
					cnt.verified.Add(1)
				}
			}
		case bytes.Contains(b, []byte(`"ok":{}`)):
			cnt.acks.Add(1)
		case bytes.Contains(b, []byte(`"error":`)):
			f, err := psignal.ParseFrame(b)
			var e psignal.Error
			if err == nil {
				json.Unmarshal(f.Body, &e)
			}
			cnt.addErr(string(e.Code))
		}
	}
}
