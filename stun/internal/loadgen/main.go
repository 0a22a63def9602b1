// Command loadgen measures peerlink's STUN server against coturn in the same run.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"peerlink/internal/coturn"
	"peerlink/stun"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

type target struct {
	name string
	pid  int
	addr netip.AddrPort
}

type result struct {
	answers  uint64
	lost     uint64
	elapsed  time.Duration
	cpu      time.Duration
	rps, rpc float64 // requests per second, per CPU-second
}

// jsonRound is one measured run in the -json output.
type jsonRound struct {
	Round      int     `json:"round"`
	Server     string  `json:"server"`
	Answers    uint64  `json:"answers"`
	Lost       uint64  `json:"lost"`
	Seconds    float64 `json:"seconds"`
	CPUSeconds float64 `json:"cpuSeconds"`
	ReqPerSec  float64 `json:"reqPerSec"`
	ReqPerCPUs float64 `json:"reqPerCPUSecond"`
}

// jsonReport is what -json prints on stdout: the setup and every run, so that a caller
// can take its own medians.
type jsonReport struct {
	Sockets int         `json:"sockets"`
	Window  int         `json:"window"`
	Seconds float64     `json:"seconds"`
	CPUs    int         `json:"cpus"`
	Servers []string    `json:"servers"`
	Rounds  []jsonRound `json:"rounds"`
}

// run starts peerlink's server and coturn as child processes on loopback, drives each in
// turn with the same sockets and window of Binding requests, and prints requests per
// second and requests per second of server CPU, read from /proc/<pid>/stat so that only
// the server process's own threads count:
//
//	go run ./stun/internal/loadgen -duration 5s -rounds 3
func run() error {
	var (
		peerlinkBin = flag.String("peerlink", "", "peerlink binary (default: build ./cmd/peerlink)")
		duration    = flag.Duration("duration", 5*time.Second, "measured time per run")
		warmup      = flag.Duration("warmup", time.Second, "load before each measurement")
		rounds      = flag.Int("rounds", 3, "runs per server, alternating")
		sockets     = flag.Int("sockets", 32, "client sockets")
		window      = flag.Int("window", 16, "requests in flight per socket")
		only        = flag.String("only", "", "run only this server: peerlink or coturn")
		serverArgs  = flag.String("peerlink-args", "--rate 1e9 --burst 1e9", "extra flags for peerlink stun (the default keeps the rate limiter in the path without limiting)")
		echo        = flag.Bool("echo", false, "also measure a minimal batched UDP echo server, the raw limit of this machine's UDP path")
		jsonOut     = flag.Bool("json", false, "print every run as JSON on stdout (the text goes to stderr)")
		role        = flag.String("role", "load", "load, or echo: be the echo server (used by -echo)")
		listen      = flag.String("listen", "127.0.0.1:0", "echo role: address to listen on")
	)
	flag.Parse()
	if *role == "echo" {
		return serveEcho(*listen)
	}
	out := io.Writer(os.Stdout)
	if *jsonOut {
		out = os.Stderr
	}
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "peerlink-loadgen")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	lo := netip.MustParseAddr("127.0.0.1")

	var targets []target
	if *only != "coturn" {
		bin := *peerlinkBin
		if bin == "" {
			bin = filepath.Join(dir, "peerlink")
			if out, err := exec.Command("go", "build", "-o", bin, "peerlink/cmd/peerlink").CombinedOutput(); err != nil {
				return fmt.Errorf("building peerlink: %v\n%s", err, out)
			}
		}
		port, err := coturn.FreePorts(lo)
		if err != nil {
			return err
		}
		addr := netip.AddrPortFrom(lo, port)
		args := append([]string{"stun", "--listen", addr.String(), "--tcp=false"}, strings.Fields(*serverArgs)...)
		cmd := exec.Command(bin, args...)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			return err
		}
		defer func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() }()
		if err := waitReady(addr); err != nil {
			return err
		}
		targets = append(targets, target{"peerlink", cmd.Process.Pid, addr})
	}
	if *only != "peerlink" {
		port, err := coturn.FreePorts(lo)
		if err != nil {
			return err
		}
		srv, err := coturn.Start(ctx, coturn.Options{IPs: []netip.Addr{lo}, Port: port, Dir: dir})
		if errors.Is(err, coturn.ErrNotInstalled) {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
		} else if err != nil {
			return err
		} else {
			defer srv.Close()
			targets = append(targets, target{"coturn", srv.Pid(), netip.AddrPortFrom(lo, port)})
		}
	}
	if *echo {
		cmd, addr, err := startEcho()
		if err != nil {
			return err
		}
		defer func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() }()
		if err := waitReady(addr); err != nil {
			return fmt.Errorf("echo server: %w", err)
		}
		targets = append(targets, target{"echo", cmd.Process.Pid, addr})
	}
	rep := jsonReport{Sockets: *sockets, Window: *window, Seconds: duration.Seconds(), CPUs: numCPU()}
	for _, tg := range targets {
		rep.Servers = append(rep.Servers, tg.name)
	}

	fmt.Fprintf(out, "loadgen: %d sockets x %d in flight, %v per run after %v warm-up, %d rounds; %d CPUs\n",
		*sockets, *window, *duration, *warmup, *rounds, numCPU())
	results := map[string][]result{}
	for r := range *rounds {
		for _, tg := range targets {
			res, err := measure(tg, *sockets, *window, *warmup, *duration)
			if err != nil {
				return fmt.Errorf("%s: %w", tg.name, err)
			}
			results[tg.name] = append(results[tg.name], res)
			rep.Rounds = append(rep.Rounds, jsonRound{Round: r + 1, Server: tg.name, Answers: res.answers, Lost: res.lost,
				Seconds: res.elapsed.Seconds(), CPUSeconds: res.cpu.Seconds(), ReqPerSec: res.rps, ReqPerCPUs: res.rpc})
			fmt.Fprintf(out, "round %d %-8s %9.0f req/s  %9.0f req/CPU-s  (server CPU %.2f cores, %d answers, %d lost)\n",
				r+1, tg.name, res.rps, res.rpc, res.cpu.Seconds()/res.elapsed.Seconds(), res.answers, res.lost)
		}
	}
	fmt.Fprintln(out, "median:")
	med := map[string]result{}
	for _, tg := range targets {
		med[tg.name] = median(results[tg.name])
		fmt.Fprintf(out, "  %-8s %9.0f req/s  %9.0f req/CPU-s\n", tg.name, med[tg.name].rps, med[tg.name].rpc)
	}
	if p, c := med["peerlink"], med["coturn"]; p.rps > 0 && c.rps > 0 {
		fmt.Fprintf(out, "peerlink/coturn: %.2fx req/s, %.2fx req/CPU-s\n", p.rps/c.rps, p.rpc/c.rpc)
	}
	if *jsonOut {
		return json.NewEncoder(os.Stdout).Encode(rep)
	}
	return nil
}

// startEcho runs this program as the echo server, a child process so that its CPU time
// is its own, and returns its address.
func startEcho() (*exec.Cmd, netip.AddrPort, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	cmd := exec.Command(exe, "-role", "echo")
	cmd.Stderr = os.Stderr
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	if err := cmd.Start(); err != nil {
		return nil, netip.AddrPort{}, err
	}
	line, err := bufio.NewReader(pipe).ReadString('\n')
	addr, perr := netip.ParseAddrPort(strings.TrimSpace(strings.TrimPrefix(line, "LISTEN ")))
	if err != nil || perr != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, netip.AddrPort{}, fmt.Errorf("echo server did not start: %q", line)
	}
	go io.Copy(io.Discard, pipe)
	return cmd, addr, nil
}

// serveEcho is the raw limit: GOMAXPROCS SO_REUSEPORT sockets, as peerlink's server has,
// each answering batches (recvmmsg, sendmmsg) with the datagram it got, its first two
// bytes made a Binding success type so the load generator counts it. Nothing is parsed.
func serveEcho(listen string) error {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	// A port free without SO_REUSEPORT, so no other process's socket joins ours.
	probe, err := net.ListenPacket("udp4", listen)
	if err != nil {
		return err
	}
	addr := probe.LocalAddr().String()
	probe.Close()
	n := runtime.GOMAXPROCS(0)
	conns := make([]net.PacketConn, n)
	for i := range conns {
		if conns[i], err = lc.ListenPacket(context.Background(), "udp4", addr); err != nil {
			return err
		}
	}
	fmt.Printf("LISTEN %s\n", addr)
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { echoLoop(ipv4.NewPacketConn(c)) })
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	for _, c := range conns {
		c.Close()
	}
	wg.Wait()
	return nil
}

func echoLoop(pc *ipv4.PacketConn) {
	const batch = 64
	ms := make([]ipv4.Message, batch)
	for k := range ms {
		ms[k].Buffers = [][]byte{make([]byte, 1500)}
	}
	out := make([]ipv4.Message, batch)
	for k := range out {
		out[k].Buffers = make([][]byte, 1)
	}
	for {
		n, err := pc.ReadBatch(ms, 0)
		if err != nil {
			return
		}
		m := 0
		for k := range n {
			b := ms[k].Buffers[0][:ms[k].N]
			if len(b) < 2 {
				continue
			}
			b[0], b[1] = 0x01, 0x01
			out[m].Buffers[0], out[m].Addr = b, ms[k].Addr
			m++
		}
		for sent := 0; sent < m; {
			w, err := pc.WriteBatch(out[sent:m], 0)
			if err != nil {
				return
			}
			sent += w
		}
	}
}

func median(rs []result) result {
	slices.SortFunc(rs, func(a, b result) int {
		switch {
		case a.rps < b.rps:
			return -1
		case a.rps > b.rps:
			return 1
		}
		return 0
	})
	m := rs[len(rs)/2]
	// Report the median of each figure on its own.
	rpc := make([]float64, len(rs))
	for i, r := range rs {
		rpc[i] = r.rpc
	}
	slices.Sort(rpc)
	m.rpc = rpc[len(rpc)/2]
	return m
}

func waitReady(addr netip.AddrPort) error {
	c, err := net.ListenUDP("udp", nil)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 1500)
	for range 100 {
		c.WriteToUDPAddrPort(stun.AppendBindingRequest(nil, stun.NewTransactionID(), stun.RequestOptions{}), addr)
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, _, err := c.ReadFromUDPAddrPort(buf); err == nil && stun.IsMessage(buf[:n]) {
			return nil
		}
	}
	return fmt.Errorf("no answer from %v", addr)
}

// cpuTime reads the user and system time of process pid, all its threads.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	// utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	const clockTick = 100 // USER_HZ on every Linux architecture Go supports
	return time.Duration(utime+stime) * time.Second / clockTick, nil
}

func numCPU() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "processor\t:")
}

// measure drives tg with sockets x window requests in flight: a closed loop in which
// every answer releases the next request.
func measure(tg target, sockets, window int, warmup, duration time.Duration) (result, error) {
	var (
		answers, lost atomic.Uint64
		counting      atomic.Bool
		stop          atomic.Bool
		wg            sync.WaitGroup
		errOnce       sync.Once
		firstErr      error
	)
	conns := make([]*net.UDPConn, sockets)
	for i := range conns {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(tg.addr))
		if err != nil {
			return result{}, err
		}
		defer c.Close()
		conns[i] = c
	}
	for i, c := range conns {
		wg.Go(func() {
			if err := drive(c, uint32(i), window, &answers, &lost, &counting, &stop); err != nil {
				errOnce.Do(func() { firstErr = err })
			}
		})
	}
	time.Sleep(warmup)
	cpu0, err := cpuTime(tg.pid)
	if err != nil {
		stop.Store(true)
		wg.Wait()
		return result{}, err
	}
	start := time.Now()
	counting.Store(true)
	time.Sleep(duration)
	counting.Store(false)
	elapsed := time.Since(start)
	cpu1, err := cpuTime(tg.pid)
	stop.Store(true)
	wg.Wait()
	if err != nil {
		return result{}, err
	}
	if firstErr != nil {
		return result{}, firstErr
	}
	res := result{answers: answers.Load(), lost: lost.Load(), elapsed: elapsed, cpu: cpu1 - cpu0}
	res.rps = float64(res.answers) / elapsed.Seconds()
	if res.cpu > 0 {
		res.rpc = float64(res.answers) / res.cpu.Seconds()
	}
	return res, nil
}

// drive runs one socket's closed loop with batched reads and writes, so that the load
// generator spends as little CPU as it can.
func drive(c *net.UDPConn, id uint32, window int, answers, lost *atomic.Uint64, counting, stop *atomic.Bool) error {
	const batch = 64
	pc := ipv4.NewPacketConn(c)
	reqs := make([][]byte, batch)
	out := make([]ipv4.Message, batch)
	in := make([]ipv4.Message, batch)
	var seq uint64
	for k := range batch {
		reqs[k] = stun.AppendBindingRequest(nil, stun.TransactionID{}, stun.RequestOptions{})
		out[k].Buffers = [][]byte{reqs[k]}
		in[k].Buffers = [][]byte{make([]byte, 1500)}
	}
	send := func(n int) error {
		for k := range n {
			seq++
			putID(reqs[k], id, seq)
		}
		for sent := 0; sent < n; {
			m, err := pc.WriteBatch(out[sent:n], 0)
			if err != nil {
				return err
			}
			sent += m
		}
		return nil
	}
	inFlight := window
	for k := 0; k < window; k += batch {
		if err := send(min(batch, window-k)); err != nil {
			return err
		}
	}
	for !stop.Load() {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := pc.ReadBatch(in, 0)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Everything in flight was lost: start the window over.
				lost.Add(uint64(inFlight))
				for k := 0; k < window; k += batch {
					if err := send(min(batch, window-k)); err != nil {
						return err
					}
				}
				inFlight = window
				continue
			}
			return err
		}
		good := 0
		for k := range n {
			b := in[k].Buffers[0][:in[k].N]
			if len(b) >= 20 && b[0] == 0x01 && b[1] == 0x01 {
				good++
			}
		}
		if counting.Load() {
			answers.Add(uint64(good))
		}
		if err := send(n); err != nil {
			return err
		}
	}
	return nil
}

// putID gives request b (a Binding request ending in FINGERPRINT) a fresh transaction
// ID, and so a fresh FINGERPRINT.
func putID(b []byte, id uint32, seq uint64) {
	binary.BigEndian.PutUint32(b[8:12], id)
	binary.BigEndian.PutUint64(b[12:20], seq)
	binary.BigEndian.PutUint32(b[len(b)-4:], crc32.ChecksumIEEE(b[:len(b)-8])^0x5354554e)
}
