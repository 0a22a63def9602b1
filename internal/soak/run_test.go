package soak

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"peerlink/connect"
)

// stats is what the run counts while it runs.
type stats struct {
	attempts, transfers, bytes    atomic.Int64
	dgramsSent, dgramsOK          atomic.Int64
	integrity                     atomic.Int64
	interrupted, rebindAffected   atomic.Int64
	restarts, rebinds, startFails atomic.Int64

	mu           sync.Mutex
	connects     map[connect.Method]int // at Connect's return
	final        map[connect.Method]int // after the transfer
	failed       map[string]int         // by stage and error, not counting interruptions
	rebindFailed map[string]int
	firstCorrupt string
}

func (s *stats) connected(m connect.Method) {
	s.mu.Lock()
	s.connects[m]++
	s.mu.Unlock()
}

func (s *stats) corrupt(what string) {
	if s.integrity.Add(1) == 1 {
		s.mu.Lock()
		s.firstCorrupt = what
		s.mu.Unlock()
	}
}

// datagram checks one received datagram's own checksum.
func (s *stats) datagram(b []byte) {
	if len(b) != dgramLen {
		s.corrupt(fmt.Sprintf("datagram of %d bytes, want %d", len(b), dgramLen))
		return
	}
	sum := sha256.Sum256(b[:4+dgramBody])
	if string(sum[:]) != string(b[4+dgramBody:]) {
		s.corrupt(fmt.Sprintf("datagram %d: checksum mismatch", binary.BigEndian.Uint32(b)))
		return
	}
	s.dgramsOK.Add(1)
}

// report is the run's outcome, for the checks and the log.
type report struct {
	p                           params
	elapsed                     time.Duration
	attempts, transfers, bytes  int64
	dgramsSent, dgramsOK        int64
	integrityErrors             int64
	firstIntegrity              string
	interrupted, rebindAffected int64
	restarts, rebinds           int64
	startFails                  int64
	connects, final             map[connect.Method]int
	failReasons, rebindReasons  map[string]int
	heapSamples                 []uint64
	goroutinePeak               int
	idleBefore, idleWarm        int
	idleAfter                   int
	heapWarmIdle, heapEndIdle   uint64
	warmSplit, endSplit         heapShare
	goroutineSamples            []int
	heapBefore, heapAfter       uint64
	fdsBefore, fdsAfter         int
	goroutinesAfter             int
}

func (r *report) failures() int {
	n := 0
	for _, v := range r.failReasons {
		n += v
	}
	return n
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
func mibs(v []uint64) string {
	s := make([]string, len(v))
	for i, b := range v {
		s[i] = fmt.Sprintf("%.1f", float64(b)/(1<<20))
	}
	return "[" + strings.Join(s, " ") + "] MiB"
}

func (r *report) log(t *testing.T) {
	t.Logf("soak: %d peers, %d initiating, %v; links %v ±%v, %.0f%% loss; mapping timeout %v; rebinding every %v; restarts every %v",
		r.p.peers, r.p.workers, r.elapsed.Round(time.Second), r.p.latency, r.p.jitter, 100*r.p.loss, r.p.mappingTimeout, r.p.rebindEvery, r.p.restartEvery)
	t.Logf("soak: %d connection attempts; connected as %v, ended as %v", r.attempts, methods(r.connects), methods(r.final))
	t.Logf("soak: %d transfers intact, %.1f MiB on streams; datagrams %d sent, %d arrived intact (%.1f%%); %d corrupted",
		r.transfers, float64(r.bytes)/(1<<20), r.dgramsSent, r.dgramsOK, pct(r.dgramsOK, r.dgramsSent), r.integrityErrors)
	t.Logf("soak: failures %d %v; interrupted by a restart %d; failed after a rebinding %d %v",
		r.failures(), r.failReasons, r.interrupted, r.rebindAffected, r.rebindReasons)
	t.Logf("soak: %d restarts (%d failed to start), %d rebindings", r.restarts, r.startFails, r.rebinds)
	t.Logf("soak: with the nodes idle: goroutines %d before the churn, %d after warm-up, %d at the end; heap %s after warm-up, %s at the end",
		r.idleBefore, r.idleWarm, r.idleAfter, mib(r.heapWarmIdle), mib(r.heapEndIdle))
	t.Logf("soak: idle heap profile after warm-up: %v; at the end: %v", r.warmSplit, r.endSplit)
	t.Logf("soak: heap %s before, samples %s, %s after teardown; goroutines %v, %d after; fds %d before, %d after",
		mib(r.heapBefore), mibs(r.heapSamples), mib(r.heapAfter), r.goroutineSamples, r.goroutinesAfter, r.fdsBefore, r.fdsAfter)
}

func pct(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}

func methods(m map[connect.Method]int) string {
	var s []string
	for _, k := range []connect.Method{connect.MethodDirect, connect.MethodPunched, connect.MethodRelayed, connect.MethodNone} {
		if m[k] > 0 {
			s = append(s, fmt.Sprintf("%v %d", k, m[k]))
		}
	}
	return strings.Join(s, ", ")
}

// reason shortens an error to its kind, so that reasons aggregate.
func reason(stage string, err error) string {
	for _, e := range []error{connect.ErrTimeout, connect.ErrPeerOffline, connect.ErrNoRelay, connect.ErrPunchFailed, connect.ErrClosed} {
		if errors.Is(err, e) {
			return stage + ": " + e.Error()
		}
	}
	msg := err.Error()
	if len(msg) > 80 {
		msg = msg[:80]
	}
	return stage + ": " + msg
}

// run churns the peers for p.duration and tears them down.
func run(t *testing.T, w *world, p params) *report {
	st := &stats{connects: map[connect.Method]int{}, final: map[connect.Method]int{}, failed: map[string]int{}, rebindFailed: map[string]int{}}
	peers := addPeers(w, p)
	var wg sync.WaitGroup
	for _, pe := range peers {
		wg.Go(func() {
			if _, err := pe.start(w, st); err != nil {
				t.Errorf("starting %s (%s): %v", pe.name, pe.kind, err)
			}
		})
	}
	wg.Wait()
	defer func() {
		for _, pe := range peers {
			wg.Go(pe.stop)
		}
		wg.Wait()
	}()
	if t.Failed() {
		return nil
	}

	idleBefore := settle(0)
	// gate is held for reading by every exchange, restart and rebinding, so that
	// taking it for writing quiesces the churn with every node still up.
	var gate sync.RWMutex

	start := time.Now()
	stop := make(chan struct{})
	var bg sync.WaitGroup
	rng := rand.New(rand.NewPCG(1, 2))
	var rngMu sync.Mutex
	randN := func(n int) int {
		rngMu.Lock()
		defer rngMu.Unlock()
		return rng.IntN(n)
	}

	// Workers: the first p.workers peers connect to random others, one at a time.
	progs := make([]*progress, p.workers)
	for i := range p.workers {
		pe := peers[i]
		at := &progress{}
		progs[i] = at
		bg.Go(func() {
			defer at.set("done")
			wrng := rand.New(rand.NewPCG(uint64(i), 99))
			for !stopped(stop) {
				func() {
					gate.RLock()
					defer gate.RUnlock()
					g := pe.current()
					tp := peers[wrng.IntN(len(peers))]
					tg := tp.current()
					if g == nil || tg == nil || tp == pe {
						time.Sleep(50 * time.Millisecond)
						return
					}
					st.attempts.Add(1)
					at.mu.Lock()
					at.desc = fmt.Sprintf("%s (%s) → %s (%s)", pe.name, pe.kind, tp.name, tp.kind)
					at.from, at.to = g, tg
					at.mu.Unlock()
					m, n, stage, err := g.exchange(tg.node.NodeID(), wrng, p, st, at)
					at.set("idle")
					switch {
					case err == nil:
						st.transfers.Add(1)
						st.bytes.Add(int64(n))
						st.mu.Lock()
						st.final[m]++
						st.mu.Unlock()
					case g.closed.Load() || tg.closed.Load():
						st.interrupted.Add(1)
					case g.rebound.Load() || tg.rebound.Load():
						st.rebindAffected.Add(1)
						st.mu.Lock()
						st.rebindFailed[reason(stage, err)]++
						st.mu.Unlock()
					default:
						st.mu.Lock()
						st.failed[fmt.Sprintf("%s (%s→%s)", reason(stage, err), pe.kind, tp.kind)]++
						st.mu.Unlock()
					}
				}()
				pause := time.Duration(wrng.IntN(200)) * time.Millisecond
				if p.idleProb > 0 && wrng.Float64() < p.idleProb {
					pause = p.mappingTimeout * 3 / 2
				}
				select {
				case <-time.After(pause):
				case <-stop:
					return
				}
			}
		})
	}

	// Restarts: one random peer at a time closes its node and comes back, so that on
	// average each restarts every p.restartEvery.
	restart := func(pe *peer) {
		gate.RLock()
		defer gate.RUnlock()
		pe.stop()
		st.restarts.Add(1)
		if _, err := pe.start(w, st); err != nil {
			st.startFails.Add(1)
			t.Logf("restarting %s: %v", pe.name, err)
		}
	}
	bg.Go(func() {
		tick := time.NewTicker(p.restartEvery / time.Duration(p.peers))
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				restart(peers[randN(len(peers))])
			}
		}
	})

	// Rebinding: a random NAT forgets its mappings or moves to a new address; a few
	// seconds later its peer restarts, as an application told of a network change would.
	var nextIP atomic.Int32
	bg.Go(func() {
		tick := time.NewTicker(p.rebindEvery)
		defer tick.Stop()
		var later sync.WaitGroup
		defer later.Wait()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			gate.RLock()
			pe := peers[randN(len(peers))]
			g := pe.current()
			if pe.nat == nil || g == nil {
				gate.RUnlock()
				continue
			}
			g.rebound.Store(true)
			if randN(2) == 0 || pe.kind == "cgnat" {
				pe.nat.Flush()
			} else {
				k := nextIP.Add(1)
				pe.nat.SetPublicIP(netip.AddrFrom4([4]byte{198, 18, byte(k / 250), byte(k%250 + 1)}))
			}
			st.rebinds.Add(1)
			gate.RUnlock()
			if p.rebindRestart <= 0 {
				continue
			}
			later.Go(func() {
				select {
				case <-time.After(p.rebindRestart):
					if pe.current() == g {
						restart(pe)
					}
				case <-stop:
				}
			})
		}
	})

	// Heap samples after a warm-up of a quarter of the run.
	var samples []uint64
	var gs []int
	peak := 0
	bg.Go(func() {
		select {
		case <-time.After(p.duration / 4):
		case <-stop:
			return
		}
		tick := time.NewTicker(p.sample)
		defer tick.Stop()
		for {
			samples = append(samples, heapNow())
			gs = append(gs, runtime.NumGoroutine())
			peak = max(peak, gs[len(gs)-1])
			if os.Getenv("SOAK_DEBUG") != "" {
				buf := make([]byte, 64<<20)
				all := string(buf[:runtime.Stack(buf, true)])
				busy := 0
				for _, at := range progs {
					if s := at.String(); !strings.Contains(s, "idle") && !strings.Contains(s, "done") {
						busy++
					}
				}
				t.Logf("sample: %d goroutines, %d punch attempts (%d initiator, %d responder), %d session servers, %d exchanges busy",
					gs[len(gs)-1], strings.Count(all, "punch.(*Attempt).Run("), strings.Count(all, "connect.(*Conn).run("), strings.Count(all, "connect.(*Conn).respond("),
					strings.Count(all, "soak.(*gen).serve("), busy)
			}
			if f := os.Getenv("SOAK_GOROUTINES"); f != "" && gs[len(gs)-1] == peak {
				if out, err := os.Create(f); err == nil {
					pprof.Lookup("goroutine").WriteTo(out, 1)
					out.Close()
				}
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	})

	// The heap after warm-up is taken with the churn paused and the nodes idle, as is
	// the heap at the end: the load in flight (a birthday attempt alone is hundreds
	// of sockets) swings the heap far more than any leak would in one run.
	time.Sleep(p.duration / 4)
	gate.Lock()
	idleWarm := settle(idleBefore + idleBefore/5 + 20)
	heapWarm := heapNow()
	warmSplit := heapSplit()
	writeHeap("warm")
	gate.Unlock()

	time.Sleep(p.duration - p.duration/4)
	close(stop)
	// Exchanges in flight may finish; ones stuck past a grace are cut by stopping the
	// peers (and count as interrupted).
	finished := make(chan struct{})
	go func() { bg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(20 * time.Second):
		for _, at := range progs {
			if s := at.String(); !strings.Contains(s, "done") {
				t.Logf("soak: still running 20 s after the end: %s", s)
			}
		}
		t.Logf("soak: stopping the peers")
		for _, pe := range peers {
			wg.Go(pe.stop)
		}
		wg.Wait()
		<-finished
	}
	elapsed := time.Since(start)
	// With every exchange over and the nodes still up, goroutines (each natlab socket
	// has a reader) must come back to where they were before the churn: anything more
	// lives as long as the node, a leak goleak cannot see because Close ends it.
	idleAfter := settle(idleBefore + idleBefore/5 + 20)
	heapEnd := heapNow()
	endSplit := heapSplit()
	writeHeap("end")
	if idleAfter > idleBefore+idleBefore/5+20 {
		t.Errorf("idle nodes hold %d goroutines after the churn, %d before it", idleAfter, idleBefore)
		if f := os.Getenv("SOAK_GOROUTINES"); f != "" {
			if out, err := os.Create(f + ".idle"); err == nil {
				pprof.Lookup("goroutine").WriteTo(out, 1)
				out.Close()
			}
		}
	}

	st.mu.Lock()
	defer st.mu.Unlock()
	return &report{
		p: p, elapsed: elapsed,
		attempts: st.attempts.Load(), transfers: st.transfers.Load(), bytes: st.bytes.Load(),
		dgramsSent: st.dgramsSent.Load(), dgramsOK: st.dgramsOK.Load(),
		integrityErrors: st.integrity.Load(), firstIntegrity: st.firstCorrupt,
		interrupted: st.interrupted.Load(), rebindAffected: st.rebindAffected.Load(),
		restarts: st.restarts.Load(), rebinds: st.rebinds.Load(), startFails: st.startFails.Load(),
		connects: st.connects, final: st.final, failReasons: st.failed, rebindReasons: st.rebindFailed,
		idleBefore: idleBefore, idleWarm: idleWarm, idleAfter: idleAfter, heapWarmIdle: heapWarm, heapEndIdle: heapEnd, warmSplit: warmSplit, endSplit: endSplit, heapSamples: samples, goroutinePeak: peak, goroutineSamples: gs,
	}
}

// settle waits up to 20 s for the goroutine count to drop to want (or, with want 0,
// to stop changing) and returns it.
func settle(want int) int {
	n := runtime.NumGoroutine()
	for range 40 {
		time.Sleep(500 * time.Millisecond)
		m := runtime.NumGoroutine()
		if (want > 0 && m <= want) || (want == 0 && m == n) {
			return m
		}
		n = m
	}
	return n
}

func stopped(stop <-chan struct{}) bool {
	select {
	case <-stop:
		return true
	default:
		return false
	}
}

// writeHeap saves a heap profile to $SOAK_HEAP.<name>, for comparing the idle heaps
// with go tool pprof -base.
func writeHeap(name string) {
	f := os.Getenv("SOAK_HEAP")
	if f == "" {
		return
	}
	if out, err := os.Create(f + "." + name); err == nil {
		pprof.Lookup("heap").WriteTo(out, 0)
		out.Close()
	}
}
