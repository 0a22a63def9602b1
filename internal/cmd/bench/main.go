// Command bench is peerlink's one-command benchmark: it builds everything, installs
// coturn when missing (as root), measures STUN, the TURN relay, rendezvous, NAT
// profiling and connecting side by side on this machine, and prints one table (and
// JSON) of medians with min, max and targets.
//
//	go run ./internal/cmd/bench                 # everything, 3 runs per figure
//	go run ./internal/cmd/bench -quick          # shorter runs, a few NAT kinds
//	go run ./internal/cmd/bench -only stun,relay -o bench.json
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"peerlink/internal/benchrun"
)

// sections in the order they run and print.
var sections = []string{"stun", "relay", "rendezvous", "profiling", "connect"}

func main() {
	var o options
	flag.StringVar(&o.only, "only", "", "comma-separated sections to run: "+strings.Join(sections, ","))
	flag.BoolVar(&o.quick, "quick", false, "shorter runs and fewer NAT kinds: a check that everything works, not figures to publish")
	flag.IntVar(&o.runs, "runs", 3, "runs per figure (medians with min and max)")
	flag.BoolVar(&o.json, "json", false, "print the report as JSON instead of the table")
	flag.StringVar(&o.out, "o", "", "also write the report as JSON to this file")
	flag.BoolVar(&o.install, "install", true, "install coturn with apt-get when it is missing and this runs as root")
	flag.Parse()
	if err := run(context.Background(), o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type options struct {
	only    string
	quick   bool
	runs    int
	json    bool
	out     string
	install bool
}

// selected returns the sections to run, in order, or an error naming an unknown one.
func selected(only string) ([]string, error) {
	if only == "" {
		return sections, nil
	}
	want := map[string]bool{}
	for s := range strings.SplitSeq(only, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !slices.Contains(sections, s) {
			return nil, fmt.Errorf("unknown section %q (have %s)", s, strings.Join(sections, ","))
		}
		want[s] = true
	}
	var out []string
	for _, s := range sections {
		if want[s] {
			out = append(out, s)
		}
	}
	return out, nil
}

func run(ctx context.Context, o options, stdout io.Writer) error {
	secs, err := selected(o.only)
	if err != nil {
		return err
	}
	if o.runs < 1 {
		return errors.New("-runs must be at least 1")
	}
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "peerlink-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	if needsCoturn(secs) && o.install {
		if err := ensureCoturn(ctx); err != nil {
			progress("coturn: %v", err)
		}
	}
	b := &bench{o: o, root: root, dir: dir, rep: &benchrun.Report{Started: time.Now(), Quick: o.quick}}
	b.rep.Machine = benchrun.ThisMachine()
	b.rep.Load[0] = benchrun.LoadAverage()
	progress("building peerlink and the load generators")
	if err := b.build(secs); err != nil {
		return err
	}
	for _, s := range secs {
		progress("section %s", s)
		start := time.Now()
		if err := b.section(ctx, s); err != nil {
			b.rep.Problem(s, err)
			progress("section %s: %v", s, err)
		}
		progress("section %s took %v", s, time.Since(start).Round(time.Second))
	}
	b.rep.Load[1] = benchrun.LoadAverage()
	b.rep.Seconds = time.Since(b.rep.Started).Round(time.Second).Seconds()
	if o.out != "" {
		f, err := os.Create(o.out)
		if err != nil {
			return err
		}
		if err := b.rep.WriteJSON(f); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	if o.json {
		return b.rep.WriteJSON(stdout)
	}
	return b.rep.WriteTable(stdout)
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

func needsCoturn(secs []string) bool {
	return slices.Contains(secs, "stun") || slices.Contains(secs, "relay")
}

// ensureCoturn installs Debian's coturn when turnserver is missing and this is root.
func ensureCoturn(ctx context.Context) error {
	if _, err := exec.LookPath("turnserver"); err == nil {
		if _, err := exec.LookPath("turnutils_uclient"); err == nil {
			return nil
		}
	}
	if os.Geteuid() != 0 {
		return errors.New("not installed and not root: install the Debian package coturn for the comparisons")
	}
	progress("installing coturn with apt-get")
	install := func() error {
		cmd := exec.CommandContext(ctx, "apt-get", "install", "-y", "--no-install-recommends", "coturn")
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("apt-get install coturn: %v\n%s", err, out)
		}
		return nil
	}
	if install() == nil {
		return nil
	}
	if out, err := exec.CommandContext(ctx, "apt-get", "update").CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get update: %v\n%s", err, out)
	}
	return install()
}

// moduleRoot is the directory of peerlink's go.mod: builds and tests run from there.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("run this inside the peerlink module (go run ./internal/cmd/bench)")
	}
	return filepath.Dir(mod), nil
}

type bench struct {
	o    options
	root string
	dir  string
	rep  *benchrun.Report
}

func (b *bench) bin(name string) string { return filepath.Join(b.dir, name) }

// build compiles what the chosen sections run, once, before any is measured.
func (b *bench) build(secs []string) error {
	var ts [][]string
	if slices.Contains(secs, "stun") || slices.Contains(secs, "relay") {
		ts = append(ts, []string{"build", "-o", b.bin("peerlink"), "./cmd/peerlink"})
	}
	if slices.Contains(secs, "stun") {
		ts = append(ts, []string{"build", "-o", b.bin("stunload"), "./stun/internal/loadgen"})
	}
	if slices.Contains(secs, "relay") {
		ts = append(ts, []string{"build", "-o", b.bin("relaybench"), "./relay/internal/bench"})
	}
	if slices.Contains(secs, "rendezvous") {
		ts = append(ts, []string{"build", "-o", b.bin("sigload"), "./signal/internal/loadgen"})
	}
	if slices.Contains(secs, "profiling") {
		ts = append(ts, []string{"test", "-c", "-o", b.bin("detect.test"), "./detect"},
			[]string{"test", "-c", "-o", b.bin("natcache.test"), "./natcache"})
	}
	if slices.Contains(secs, "connect") {
		ts = append(ts, []string{"test", "-c", "-o", b.bin("connect.test"), "./connect"})
	}
	for _, args := range ts {
		cmd := exec.Command("go", args...)
		cmd.Dir = b.root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

func (b *bench) section(ctx context.Context, s string) error {
	switch s {
	case "stun":
		return b.stun(ctx)
	case "relay":
		return b.relay(ctx)
	case "rendezvous":
		return b.rendezvous(ctx)
	case "profiling":
		return b.profiling(ctx)
	case "connect":
		return b.connect(ctx)
	}
	return fmt.Errorf("unknown section %q", s)
}

// output runs a built program with a time limit; its stderr goes to ours as progress.
func (b *bench) output(ctx context.Context, limit time.Duration, dir string, env []string, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Stderr = os.Stderr
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s: %w", filepath.Base(name), err)
	}
	return out, nil
}

// decodeLast decodes the last line of out, where the load generators put their JSON.
func decodeLast(out []byte, v any) error {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return json.Unmarshal([]byte(lines[len(lines)-1]), v)
}

// stunRun is one round in stun/internal/loadgen's -json output.
type stunRun struct {
	Round  int     `json:"round"`
	Server string  `json:"server"`
	RPS    float64 `json:"reqPerSec"`
	RPC    float64 `json:"reqPerCPUSecond"`
	Lost   uint64  `json:"lost"`
}

func (b *bench) stun(ctx context.Context) error {
	dur, warm, sockets, window := 5*time.Second, time.Second, 32, 16
	if b.o.quick {
		dur, warm = 2*time.Second, 500*time.Millisecond
	}
	out, err := b.output(ctx, 10*time.Minute, b.root, nil, b.bin("stunload"), "-peerlink", b.bin("peerlink"), "-echo", "-json",
		"-rounds", strconv.Itoa(b.o.runs), "-duration", dur.String(), "-warmup", warm.String(),
		"-sockets", strconv.Itoa(sockets), "-window", strconv.Itoa(window))
	if err != nil {
		return err
	}
	b.rep.Note("stun", "Binding requests over loopback, %d sockets x %d in flight, batched closed loop; %v per run after %v warm-up; rounds interleave the servers; server CPU from /proc/<pid>/stat",
		sockets, window, dur, warm)
	return addSTUN(b.rep, out)
}

// addSTUN adds the figures of stun/internal/loadgen's -json output to r.
func addSTUN(r *benchrun.Report, out []byte) error {
	var rep struct {
		Rounds []stunRun `json:"rounds"`
	}
	if err := decodeLast(out, &rep); err != nil {
		return fmt.Errorf("stun loadgen output: %w", err)
	}
	rps, rpc := map[string][]float64{}, map[string][]float64{}
	for _, x := range rep.Rounds {
		rps[x.Server] = append(rps[x.Server], x.RPS)
		rpc[x.Server] = append(rpc[x.Server], x.RPC)
	}
	for _, s := range []string{"peerlink", "coturn", "echo"} {
		if len(rps[s]) == 0 {
			r.Problem("stun", fmt.Errorf("no %s runs", s))
		}
	}
	r.Add("stun", "peerlink", "req/s", rps["peerlink"], nil)
	r.Add("stun", "coturn", "req/s", rps["coturn"], nil)
	r.Add("stun", "raw UDP echo (limit)", "req/s", rps["echo"], nil)
	r.Add("stun", "peerlink/coturn", "x req/s", benchrun.Ratios(rps["peerlink"], rps["coturn"]), benchrun.AtLeast(1))
	r.Add("stun", "peerlink/echo", "x req/s", benchrun.Ratios(rps["peerlink"], rps["echo"]), nil)
	r.Add("stun", "peerlink", "req/CPU-s", rpc["peerlink"], nil)
	r.Add("stun", "coturn", "req/CPU-s", rpc["coturn"], nil)
	r.Add("stun", "raw UDP echo (limit)", "req/CPU-s", rpc["echo"], nil)
	r.Add("stun", "peerlink/coturn", "x req/CPU-s", benchrun.Ratios(rpc["peerlink"], rpc["coturn"]), benchrun.AtLeast(1.5))
	r.Add("stun", "peerlink/echo", "x req/CPU-s", benchrun.Ratios(rpc["peerlink"], rpc["echo"]), nil)
	return nil
}

// relayRun is one uclient run in relay/internal/bench's -json output.
type relayRun struct {
	Server   string  `json:"server"`
	Sessions string  `json:"sessions"`
	Rate     float64 `json:"msgsPerSec"`
	PerCPU   float64 `json:"msgsPerCPUSecond"`
	Loss     float64 `json:"lossPercent"`
}

func (b *bench) relay(ctx context.Context) error {
	msgs, idle := 1000, 2000
	if b.o.quick {
		msgs, idle = 200, 300
	}
	out, err := b.output(ctx, 30*time.Minute, b.root, nil, b.bin("relaybench"), "-peerlink", b.bin("peerlink"), "-json",
		"-modes", "c2c", "-sessions", "10,100", "-z", "0", "-l", "1200", "-n", strconv.Itoa(msgs),
		"-runs", strconv.Itoa(b.o.runs), "-idle", strconv.Itoa(idle), "-idle-runs", strconv.Itoa(b.o.runs))
	if err != nil {
		return err
	}
	b.rep.Note("relay", "turnutils_uclient -y (client to client, both allocations on the server under test) -l 1200 -n %d -z 0 over loopback; servers alternate; idle memory: RSS growth over %d allocations on a fresh server",
		msgs, idle)
	return addRelay(b.rep, out)
}

// addRelay adds the figures of relay/internal/bench's -json output to r.
func addRelay(r *benchrun.Report, out []byte) error {
	var rep struct {
		Runs      []relayRun           `json:"runs"`
		IdleBytes map[string][]float64 `json:"idleBytesPerAllocation"`
	}
	if err := decodeLast(out, &rep); err != nil {
		return fmt.Errorf("relay bench output: %w", err)
	}
	for _, m := range []string{"10", "100"} {
		pick := func(server string, f func(relayRun) float64) []float64 {
			var xs []float64
			for _, run := range rep.Runs {
				if run.Server == server && run.Sessions == m {
					xs = append(xs, f(run))
				}
			}
			return xs
		}
		rate := func(x relayRun) float64 { return x.Rate }
		perCPU := func(x relayRun) float64 { return x.PerCPU }
		loss := func(x relayRun) float64 { return x.Loss }
		name := func(s string) string { return s + ", " + m + " sessions" }
		r.Add("relay", name("peerlink"), "msgs/s", pick("peerlink", rate), nil)
		r.Add("relay", name("coturn"), "msgs/s", pick("coturn", rate), nil)
		r.Add("relay", name("peerlink/coturn"), "x msgs/s", benchrun.Ratios(pick("peerlink", rate), pick("coturn", rate)), benchrun.AtLeast(1))
		r.Add("relay", name("peerlink"), "msgs/CPU-s", pick("peerlink", perCPU), nil)
		r.Add("relay", name("coturn"), "msgs/CPU-s", pick("coturn", perCPU), nil)
		r.Add("relay", name("peerlink/coturn"), "x msgs/CPU-s", benchrun.Ratios(pick("peerlink", perCPU), pick("coturn", perCPU)), benchrun.AtLeast(1.5))
		r.Add("relay", name("peerlink"), "% loss", pick("peerlink", loss), nil)
		r.Add("relay", name("coturn"), "% loss", pick("coturn", loss), nil)
	}
	kib := func(xs []float64) []float64 {
		out := make([]float64, len(xs))
		for i, x := range xs {
			out[i] = x / 1024
		}
		return out
	}
	r.Add("relay", "peerlink idle allocation", "KiB RSS", kib(rep.IdleBytes["peerlink"]), nil)
	r.Add("relay", "coturn idle allocation", "KiB RSS", kib(rep.IdleBytes["coturn"]), nil)
	return nil
}

// sigReport is signal/internal/loadgen's -json output.
type sigReport struct {
	Held          float64 `json:"held"`
	RSSPerClient  float64 `json:"rssBytesPerClient"`
	HeapPerClient float64 `json:"heapBytesPerClient"`
	Delivered     float64 `json:"deliveredPerSec"`
	PerCPU        float64 `json:"routedPerCPUSecond"`
	Sent          float64 `json:"sent"`
	Lost          float64 `json:"lost"`
	Dropped       float64 `json:"connectionsLost"`
}

func (b *bench) rendezvous(ctx context.Context) error {
	clients, dur := 10000, 5*time.Second
	if b.o.quick {
		clients, dur = 1000, 2*time.Second
	}
	var held, rss, heap, rate, perCPU, lost, dropped []float64
	var errs []error
	for i := range b.o.runs {
		progress("rendezvous run %d/%d: %d clients", i+1, b.o.runs, clients)
		out, err := b.output(ctx, 10*time.Minute, b.root, nil, b.bin("sigload"), "-json", "-clients", strconv.Itoa(clients),
			"-rate", "0", "-duration", dur.String())
		// It prints its figures, and exits 1, when messages were lost.
		var rep sigReport
		if derr := decodeLast(out, &rep); derr != nil {
			errs = append(errs, fmt.Errorf("run %d: %w", i+1, cmp.Or(err, derr)))
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("run %d: %.0f of %.0f messages not delivered, %.0f connections dropped by the server",
				i+1, rep.Lost, rep.Sent, rep.Dropped))
		}
		held = append(held, rep.Held)
		if rep.Sent > 0 {
			lost = append(lost, 100*rep.Lost/rep.Sent)
		}
		dropped = append(dropped, rep.Dropped)
		rss = append(rss, rep.RSSPerClient/1024)
		heap = append(heap, rep.HeapPerClient/1024)
		rate = append(rate, rep.Delivered)
		perCPU = append(perCPU, rep.PerCPU)
	}
	b.rep.Note("rendezvous", "%d clients over loopback WebSockets, each authenticated by signature; iceCandidate messages signed in advance sent as fast as the server takes them for %v to the next client in a ring; the server (a child process, CPU from its getrusage) verifies every signature; unpaced, the server closes some connections (counted below) and their messages are lost",
		clients, dur)
	r := b.rep
	r.Add("rendezvous", "connected clients held", "clients", held, nil)
	r.Add("rendezvous", "signed messages routed", "msgs/s", rate, nil)
	r.Add("rendezvous", "signed messages routed", "msgs/CPU-s", perCPU, nil)
	r.Add("rendezvous", "messages not delivered", "% of sent", lost, nil)
	r.Add("rendezvous", "connections dropped while routing", "clients", dropped, nil)
	r.Add("rendezvous", "memory per idle client", "KiB RSS", rss, nil)
	r.Add("rendezvous", "memory per idle client", "KiB Go heap", heap, nil)
	return errors.Join(errs...)
}

func (b *bench) profiling(ctx context.Context) error {
	count := strconv.Itoa(b.o.runs)
	var errs []error
	detections := max(b.o.runs, 5)
	if b.o.quick {
		detections = b.o.runs
	}
	if os.Geteuid() != 0 {
		errs = append(errs, errors.New("fresh detection needs the kernel lab: run as root"))
	} else {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		res, err := benchrun.DetectLab(lctx, 50*time.Millisecond, detections)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("detection in the kernel lab: %w", err))
		}
		fresh := make([]float64, len(res.Fresh))
		for i, d := range res.Fresh {
			fresh[i] = ms(d)
		}
		b.rep.Add("profiling", "fresh detection, kernel lab, 50 ms delay", "ms", fresh, benchrun.Below(400))
		var first []float64
		if res.First > 0 {
			first = []float64{ms(res.First)}
		}
		b.rep.Add("profiling", "first detection in a new lab (cold ARP)", "ms", first, nil)
	}
	benchtime := "1s"
	if b.o.quick {
		benchtime = "200ms"
	}
	out, err := b.output(ctx, 5*time.Minute, filepath.Join(b.root, "natcache"), nil, b.bin("natcache.test"),
		"-test.run", "^$", "-test.bench", "^BenchmarkCacheHit$", "-test.benchtime", benchtime, "-test.count", count)
	if err != nil {
		errs = append(errs, err)
	}
	b.rep.Add("profiling", "peer profile cache hit (natcache)", "ns", nsPerOp(out, "BenchmarkCacheHit"), benchrun.Below(1000))
	out, err = b.output(ctx, 5*time.Minute, filepath.Join(b.root, "detect"), nil, b.bin("detect.test"),
		"-test.run", "^$", "-test.bench", "^BenchmarkLocalProfile$", "-test.benchtime", benchtime, "-test.count", count)
	if err != nil {
		errs = append(errs, err)
	}
	b.rep.Add("profiling", "own profile, cached (detect.LocalProfile)", "ns", nsPerOp(out, "BenchmarkLocalProfile"), benchrun.Below(1000))
	b.rep.Note("profiling", "detection: a port-restricted cone kernel NAT, 50 ms each way (100 ms RTT), %d forced detections after a first one in the new lab; caches: go benchmarks (natcache.BenchmarkCacheHit, detect.BenchmarkLocalProfile), one per run", detections)
	return errors.Join(errs...)
}

func nsPerOp(out []byte, name string) []float64 {
	var ns []float64
	for _, x := range benchrun.ParseGoBench(string(out)) {
		if v, ok := x.Metrics["ns/op"]; ok && x.Name == name {
			ns = append(ns, v)
		}
	}
	return ns
}

// quickKinds are the NAT kinds -quick connects: one of each traversal outcome.
const quickKinds = "none,port-restricted,symmetric,udp-blocked"

func (b *bench) connect(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("the kernel lab needs root")
	}
	var env []string
	if b.o.quick {
		env = append(env, "PEERLINK_LAB_KINDS="+quickKinds)
	}
	type key struct{ a, b, method string }
	first, direct := map[key][]float64{}, map[key][]float64{}
	var order []key
	var allFirst, allDirect []float64
	var errs []error
	for i := range b.o.runs {
		progress("connect run %d/%d", i+1, b.o.runs)
		out, err := b.output(ctx, 15*time.Minute, filepath.Join(b.root, "connect"), env, b.bin("connect.test"),
			"-test.run", "^TestConnectKernelLab$", "-test.v", "-test.count", "1")
		if err != nil {
			// A failed pair is in the log; the table still holds the others.
			errs = append(errs, fmt.Errorf("run %d: %w", i+1, err))
		}
		rows := benchrun.ParseConnectTable(string(out))
		if len(rows) == 0 {
			continue
		}
		var f, d []float64
		for _, row := range rows {
			k := key{row.Initiator, row.Responder, row.Method}
			if _, ok := first[k]; !ok {
				order = append(order, k)
			}
			first[k] = append(first[k], ms(row.First))
			f = append(f, ms(row.First))
			if row.Method != "relayed" {
				direct[k] = append(direct[k], ms(row.Direct))
				d = append(d, ms(row.Direct))
			}
		}
		allFirst = append(allFirst, benchrun.Summarize(f).Median)
		allDirect = append(allDirect, benchrun.Summarize(d).Median)
	}
	kinds := "every NAT kind pair"
	if b.o.quick {
		kinds = "pairs of " + quickKinds
	}
	b.rep.Note("connect", "connect.TestConnectKernelLab: %s in the kernel lab, 50 ms delay on every NAT uplink, relay first then direct; per pair: time to first byte and to the direct path (method in brackets)", kinds)
	r := b.rep
	r.Add("connect", "all pairs: median first byte", "ms", allFirst, nil)
	r.Add("connect", "direct/punched pairs: median to direct", "ms", allDirect, nil)
	for _, k := range order {
		pair := fmt.Sprintf("%s → %s (%s)", k.a, k.b, k.method)
		r.Add("connect", pair+" first byte", "ms", first[k], nil)
		if k.method != "relayed" {
			r.Add("connect", pair+" to direct", "ms", direct[k], nil)
		}
	}
	return errors.Join(errs...)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
