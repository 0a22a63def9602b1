// Command loadgen measures peerlink's STUN server against coturn in the same run.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/ipv4"

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
	)
	flag.Parse()
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

	fmt.Printf("loadgen: %d sockets x %d in flight, %v per run after %v warm-up, %d rounds; %d CPUs\n",
		*sockets, *window, *duration, *warmup, *rounds, numCPU())
	results := map[string][]result{}
	for r := range *rounds {
		for _, tg := range targets {
			res, err := measure(tg, *sockets, *window, *warmup, *duration)
			if err != nil {
				return fmt.Errorf("%s: %w", tg.name, err)
			}
			results[tg.name] = append(results[tg.name], res)
			fmt.Printf("round %d %-8s %9.0f req/s  %9.0f req/CPU-s  (server CPU %.2f cores, %d answers, %d lost)\n",
				r+1, tg.name, res.rps, res.rpc, res.cpu.Seconds()/res.elapsed.Seconds(), res.answers, res.lost)
		}
	}
	fmt.Println("median:")
	med := map[string]result{}
	for _, tg := range targets {
		med[tg.name] = median(results[tg.name])
		fmt.Printf("  %-8s %9.0f req/s  %9.0f req/CPU-s\n", tg.name, med[tg.name].rps, med[tg.name].rpc)
	}
	if p, c := med["peerlink"], med["coturn"]; p.rps > 0 && c.rps > 0 {
		fmt.Printf("peerlink/coturn: %.2fx req/s, %.2fx req/CPU-s\n", p.rps/c.rps, p.rpc/c.rpc)
	}
	return nil
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
