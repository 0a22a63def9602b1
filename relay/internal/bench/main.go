// Command bench measures peerlink's TURN relay side by side with coturn on this machine:
// coturn's own load client, turnutils_uclient, against each server in turn, interleaved
// and repeated, counting the server process's CPU from /proc/<pid>/stat; then the memory
// an idle allocation costs each server.
//
// Two modes: c2c (uclient -y: clients relay to each other's relayed addresses, both
// allocations on the server under test) and peer (clients relay to an echoing
// turnutils_peer, so every datagram crosses the server's relayed sockets).
//
//	go run ./relay/internal/bench                      # 10 and 100 sessions, paced 20 ms
//	go run ./relay/internal/bench -sessions 100 -z 0   # unpaced
//
// It needs coturn's turnserver and turnutils_uclient (Debian package coturn) and builds
// cmd/peerlink into a temporary directory. Other load on the machine skews the figures:
// run it on a quiet machine, and read the medians.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"peerlink/relay"
)

const (
	user = "bench"
	pass = "bench-password"
)

func main() {
	sessions := flag.String("sessions", "10,100", "uclient -m values (sessions), comma-separated")
	msgs := flag.Int("n", 500, "messages per session (uclient -n)")
	size := flag.Int("l", 1200, "message length (uclient -l)")
	pace := flag.String("z", "20", "per-session packet intervals in ms (uclient -z), comma-separated; 0 is unpaced")
	runs := flag.Int("runs", 3, "runs per configuration and server; the table shows medians")
	modes := flag.String("modes", "c2c,peer", "c2c (uclient -y) and/or peer (uclient to turnutils_peer), comma-separated")
	idle := flag.Int("idle", 2000, "idle allocations for the memory measurement (0 skips it)")
	flag.IntVar(&idleRuns, "idle-runs", 1, "idle memory measurements per server, each on a fresh server")
	flag.StringVar(&peerlinkBin, "peerlink", "", "peerlink binary (default: build ./cmd/peerlink)")
	flag.BoolVar(&jsonOut, "json", false, "print every run and the idle memory as JSON on stdout (the text goes to stderr)")
	flag.Parse()
	if jsonOut {
		stdout = os.Stderr
	}
	if err := run(*modes, *sessions, *pace, *msgs, *size, *runs, *idle); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

var (
	peerlinkBin string
	jsonOut     bool
	idleRuns    int
	stdout      io.Writer = os.Stdout // the text report; stderr under -json
)

// jsonRun is one uclient run in the -json output.
type jsonRun struct {
	Server     string  `json:"server"`
	Mode       string  `json:"mode"`
	Sessions   string  `json:"sessions"`
	Pace       string  `json:"paceMs"`
	Sent       int     `json:"sent"`
	Received   int     `json:"received"`
	Seconds    float64 `json:"seconds"`
	CPUSeconds float64 `json:"cpuSeconds"`
	MsgsPerSec float64 `json:"msgsPerSec"`
	PerCPUs    float64 `json:"msgsPerCPUSecond"`
	LossPct    float64 `json:"lossPercent"`
}

// jsonReport is what -json prints: every run, so that a caller can take its own medians.
type jsonReport struct {
	Coturn     string               `json:"coturnVersion"`
	Size       int                  `json:"size"`
	Messages   int                  `json:"messagesPerSession"`
	Runs       []jsonRun            `json:"runs"`
	IdleAllocs int                  `json:"idleAllocations"`
	IdleBytes  map[string][]float64 `json:"idleBytesPerAllocation,omitempty"` // one per -idle-runs
}

// server is a running relay under test.
type server struct {
	name string
	cmd  *exec.Cmd
	port int
}

func (s *server) pid() int { return s.cmd.Process.Pid }

// stop kills the server; it may be called more than once.
func (s *server) stop() {
	if s.cmd.ProcessState == nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
	}
}

func run(modeList, sessionList, paceList string, msgs, size, runs, idle int) error {
	uclient, err := exec.LookPath("turnutils_uclient")
	if err != nil {
		return errors.New("turnutils_uclient not found: install the Debian package coturn")
	}
	if _, err := exec.LookPath("turnserver"); err != nil {
		return errors.New("turnserver not found: install the Debian package coturn")
	}
	dir, err := os.MkdirTemp("", "peerlink-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := peerlinkBin
	if bin == "" {
		bin = filepath.Join(dir, "peerlink")
		fmt.Fprintln(os.Stderr, "building peerlink...")
		if out, err := exec.Command("go", "build", "-o", bin, "peerlink/cmd/peerlink").CombinedOutput(); err != nil {
			return fmt.Errorf("go build: %v\n%s", err, out)
		}
	}

	pl, err := startPeerlink(bin, dir)
	if err != nil {
		return err
	}
	defer pl.stop()
	ct, err := startCoturn(dir)
	if err != nil {
		return err
	}
	defer ct.stop()
	version, _ := exec.Command("turnserver", "--version").Output()

	var peerPort int
	if strings.Contains(modeList, "peer") {
		stopPeer, port, err := startPeer()
		if err != nil {
			return err
		}
		defer stopPeer()
		peerPort = port
	}

	var rows []row
	for _, mode := range strings.Split(modeList, ",") {
		for _, z := range strings.Split(paceList, ",") {
			for _, m := range strings.Split(sessionList, ",") {
				for r := range runs {
					for _, s := range []*server{pl, ct} {
						args := []string{"-l", strconv.Itoa(size), "-m", m, "-n", strconv.Itoa(msgs), "-z", z,
							"-u", user, "-w", pass, "-p", strconv.Itoa(s.port)}
						switch mode {
						case "c2c":
							args = append(args, "-y")
						case "peer":
							// No RTCP sessions: turnutils_peer listens on one port.
							args = append(args, "-c", "-e", "127.0.0.1", "-r", strconv.Itoa(peerPort))
						default:
							return fmt.Errorf("unknown mode %q", mode)
						}
						args = append(args, "127.0.0.1")
						fmt.Fprintf(os.Stderr, "run %d/%d: %s, %s, %s sessions, -z %s\n", r+1, runs, s.name, mode, m, z)
						res, err := measure(uclient, args, s.pid())
						if err != nil {
							return fmt.Errorf("%s: %w", s.name, err)
						}
						res.server, res.mode, res.sessions, res.pace = s.name, mode, m, z
						rows = append(rows, res)
					}
				}
			}
		}
	}

	rep := jsonReport{Coturn: strings.TrimSpace(string(version)), Size: size, Messages: msgs, IdleAllocs: idle}
	for _, r := range rows {
		rep.Runs = append(rep.Runs, jsonRun{Server: r.server, Mode: r.mode, Sessions: r.sessions, Pace: r.pace, Sent: r.sent, Received: r.recv,
			Seconds: r.transmit, CPUSeconds: r.cpu, MsgsPerSec: r.rate(), PerCPUs: r.perCPU(), LossPct: r.loss()})
	}
	fmt.Fprintf(stdout, "peerlink relay vs coturn %s, on %d CPUs: turnutils_uclient -l %d -n %d, median of %d runs each\n",
		strings.TrimSpace(string(version)), runtime.NumCPU(), size, msgs, runs)
	fmt.Fprintln(stdout, "c2c: uclient -y (clients relay to each other); peer: uclient -c -e to turnutils_peer (echo)")
	fmt.Fprintln(stdout)
	w := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "mode\t-z ms\tsessions\tserver\trelayed msgs\tmsgs/s\tserver CPU s\tmsgs per CPU-s\tloss %\t")
	for _, mode := range strings.Split(modeList, ",") {
		for _, z := range strings.Split(paceList, ",") {
			for _, m := range strings.Split(sessionList, ",") {
				var perCPU, rate [2]float64
				for i, name := range []string{pl.name, ct.name} {
					med := median(rows, mode, z, m, name)
					perCPU[i], rate[i] = med.perCPU(), med.rate()
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%.0f\t%.2f\t%.0f\t%.3f\t\n", mode, z, m, name, med.recv, med.rate(), med.cpu, med.perCPU(), med.loss())
				}
				fmt.Fprintf(w, "%s\t%s\t%s\tpeerlink/coturn\t\t%.2fx\t\t%.2fx\t\t\n", mode, z, m, rate[0]/rate[1], perCPU[0]/perCPU[1])
			}
		}
	}
	w.Flush()

	if idle > 0 {
		// Fresh servers: after the load runs, heap the runtime keeps would hide growth.
		pl.stop()
		ct.stop()
		fmt.Fprintln(stdout)
		rep.IdleBytes = map[string][]float64{}
		for range max(1, idleRuns) {
			for _, start := range []func() (*server, error){
				func() (*server, error) { return startPeerlink(bin, dir) },
				func() (*server, error) { return startCoturn(dir) },
			} {
				s, err := start()
				if err != nil {
					return err
				}
				per, err := idleMemory(s, idle)
				s.stop()
				if err != nil {
					return fmt.Errorf("%s idle memory: %w", s.name, err)
				}
				rep.IdleBytes[s.name] = append(rep.IdleBytes[s.name], per)
				fmt.Fprintf(stdout, "idle allocation, %s: %.1f KiB of server RSS each (%d allocations on a fresh server)\n", s.name, per/1024, idle)
			}
		}
	}
	if jsonOut {
		return json.NewEncoder(os.Stdout).Encode(rep)
	}
	return nil
}

type row struct {
	server, mode, sessions, pace string
	sent, recv                   int
	transmit                     float64 // seconds, as uclient reports (whole seconds)
	cpu                          float64 // server CPU seconds over the whole uclient run
}

func (r row) rate() float64 {
	if r.transmit == 0 {
		return 0
	}
	return float64(r.recv) / r.transmit
}

func (r row) perCPU() float64 {
	if r.cpu == 0 {
		return 0
	}
	return float64(r.recv) / r.cpu
}

func (r row) loss() float64 {
	if r.sent == 0 {
		return 0
	}
	return 100 * float64(r.sent-r.recv) / float64(r.sent)
}

// median picks the run with the median messages per CPU-second.
func median(rows []row, mode, z, m, server string) row {
	var rs []row
	for _, r := range rows {
		if r.mode == mode && r.pace == z && r.sessions == m && r.server == server {
			rs = append(rs, r)
		}
	}
	slices.SortFunc(rs, func(a, b row) int { return cmp.Compare(a.perCPU(), b.perCPU()) })
	return rs[len(rs)/2]
}

var (
	reTotals   = regexp.MustCompile(`start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$`)
	reTransmit = regexp.MustCompile(`Total transmit time is (\d+)`)
)

// measure runs uclient and reads the server's CPU time around it.
func measure(uclient string, args []string, pid int) (row, error) {
	before, err := cpuSeconds(pid)
	if err != nil {
		return row{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, uclient, args...).CombinedOutput()
	if err != nil {
		return row{}, fmt.Errorf("uclient: %v\n%s", err, out)
	}
	after, err := cpuSeconds(pid)
	if err != nil {
		return row{}, err
	}
	var r row
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := reTotals.FindStringSubmatch(sc.Text()); m != nil {
			r.sent, _ = strconv.Atoi(m[1])
			r.recv, _ = strconv.Atoi(m[2])
		}
		if m := reTransmit.FindStringSubmatch(sc.Text()); m != nil {
			t, _ := strconv.Atoi(m[1])
			r.transmit = float64(t)
		}
	}
	if r.sent == 0 {
		return row{}, fmt.Errorf("no totals in uclient output:\n%s", out)
	}
	r.cpu = after - before
	return r, nil
}

// cpuSeconds is the process's user plus system time, from /proc/<pid>/stat.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is parenthesised and may hold spaces.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100, nil // USER_HZ is 100 on Linux
}

func rss(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// idleMemory opens n allocations on s, holds them, and returns the server's RSS growth
// per allocation.
func idleMemory(s *server, n int) (float64, error) {
	// Warm up: the first allocations pay for one-time structures.
	warm, err := allocateMany(s.port, 20)
	if err != nil {
		return 0, err
	}
	defer closeAll(warm)
	time.Sleep(500 * time.Millisecond)
	before, err := rss(s.pid())
	if err != nil {
		return 0, err
	}
	conns, err := allocateMany(s.port, n)
	defer closeAll(conns)
	if err != nil {
		return 0, err
	}
	time.Sleep(time.Second)
	after, err := rss(s.pid())
	if err != nil {
		return 0, err
	}
	return (after - before) / float64(n), nil
}

func allocateMany(port, n int) ([]*relay.Conn, error) {
	var conns []*relay.Conn
	for range n {
		var c *relay.Conn
		var err error
		// A client port may still carry an allocation a uclient run left behind
		// (437 Allocation Mismatch): a fresh socket gets another port.
		for range 3 {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err = relay.Dial(ctx, relay.ClientConfig{Server: fmt.Sprintf("127.0.0.1:%d", port), Username: user, Password: pass})
			cancel()
			if err == nil {
				break
			}
		}
		if err != nil {
			return conns, err
		}
		conns = append(conns, c)
	}
	return conns, nil
}

// startPeer runs turnutils_peer, coturn's echoing peer, on a free port.
func startPeer() (stop func(), port int, err error) {
	port, err = freePort()
	if err != nil {
		return nil, 0, err
	}
	cmd := exec.Command("turnutils_peer", "-L", "127.0.0.1", "-p", strconv.Itoa(port))
	if err := cmd.Start(); err != nil {
		return nil, 0, fmt.Errorf("turnutils_peer: %w", err)
	}
	time.Sleep(200 * time.Millisecond)
	return func() { cmd.Process.Kill(); cmd.Wait() }, port, nil
}

func closeAll(cs []*relay.Conn) {
	for _, c := range cs {
		c.Close()
	}
}

// freePort returns a port free for UDP and TCP on 127.0.0.1 (coturn listens on both).
func freePort() (int, error) {
	for range 100 {
		port := 30000 + rand.IntN(20000)
		u, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		u.Close()
		if err != nil {
			continue
		}
		l.Close()
		return port, nil
	}
	return 0, errors.New("no free port")
}

func waitListening(port int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func startPeerlink(bin, dir string) (*server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	// Every client runs on this machine: the per-address limits are off, as coturn has
	// none by default (the request limit does not touch the data path measured here).
	cmd := exec.Command(bin, "relay", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--user", user+":"+pass, "--allow-loopback-peers",
		"--source-quota", "0", "--no-request-limit")
	log, err := os.Create(filepath.Join(dir, "peerlink.log"))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{name: "peerlink", cmd: cmd, port: port}
	if err := waitListening(port); err != nil {
		s.stop()
		return nil, fmt.Errorf("peerlink relay did not start: %w", err)
	}
	return s, nil
}

func startCoturn(dir string) (*server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	relayBase := 20000 + rand.IntN(80)*100
	conf := fmt.Sprintf(`listening-ip=127.0.0.1
listening-port=%d
relay-ip=127.0.0.1
min-port=%d
max-port=%d
realm=bench
lt-cred-mech
user=%s:%s
fingerprint
no-tls
no-dtls
no-cli
allow-loopback-peers
userdb=%s
pidfile=%s
log-file=%s
simple-log
no-stdout-log
`, port, relayBase, relayBase+4999, user, pass,
		filepath.Join(dir, "turndb"), filepath.Join(dir, "turnserver.pid"), filepath.Join(dir, "turnserver.log"))
	path := filepath.Join(dir, "turnserver.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command("turnserver", "-c", path)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{name: "coturn", cmd: cmd, port: port}
	if err := waitListening(port); err != nil {
		s.stop()
		return nil, fmt.Errorf("turnserver did not start: %w", err)
	}
	return s, nil
}
