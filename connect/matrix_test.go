package connect

import (
	"encoding/csv"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"peerlink/nat"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestMatrix connects every ordered pair of the 27 NATCracker types, over several
// seeds, through the whole connector: signaling, relay-first,
// punching. Every pair must connect; pairs the strategy marks direct-capable must end
// direct or punched in at least 95% of runs; relay-only pairs must end relayed. It prints
// the matrix and writes CSV (to $PEERLINK_MATRIX_CSV, or a temporary directory).
func TestMatrix(t *testing.T) {
	seeds := 2
	if testing.Short() {
		seeds = 1
	}
	sig := signaltest.Start(t, signal.Config{}, false)
	types := nat.AllTypes()
	type result struct {
		a, b      nat.Type
		seed      int
		technique nat.Technique
		method    Method
		first     time.Duration
		direct    time.Duration
		err       error
	}
	var (
		mu      sync.Mutex
		results []result
		wg      sync.WaitGroup
		sem     = make(chan struct{}, 4)
	)
	start := time.Now()
	for i := range types {
		for j := range types {
			for s := range seeds {
				a, b := types[i], types[j]
				wg.Add(1)
				sem <- struct{}{}
				go func() {
					defer func() { <-sem; wg.Done() }()
					seed := uint64(i*1000+j*10+s) + 1
					r := result{a: a, b: b, seed: int(seed)}
					w := newWorld(t, seed, sig)
					na, nb := w.node("a", nodeOpts{typ: a}), w.node("b", nodeOpts{typ: b})
					c, err := pair(t, na, nb, Options{})
					if err == nil {
						plan := nat.Strategy(na.Profile(), nb.Profile())
						if plan.DirectCapable() {
							// Relay-first: wait for the upgrade to settle.
							deadline := time.Now().Add(15 * time.Second)
							for time.Now().Before(deadline) {
								c.mu.Lock()
								settled := c.settled
								c.mu.Unlock()
								if settled {
									break
								}
								time.Sleep(10 * time.Millisecond)
							}
						}
						r.technique, r.method, r.first, r.direct = c.Technique(), c.Method(), c.Stats().FirstPath, c.Stats().ToDirect
					}
					r.err = err
					na.Close()
					nb.Close()
					mu.Lock()
					results = append(results, r)
					mu.Unlock()
				}()
			}
		}
	}
	wg.Wait()
	elapsed := time.Since(start)

	type tally struct {
		runs, directOK, relayed, failed int
		times                           []time.Duration
	}
	byTech := map[nat.Technique]*tally{}
	capable, capableOK, relayOnly, relayOnlyRelayed := 0, 0, 0, 0
	for _, r := range results {
		plan := nat.Strategy(profileOfType(r.a), profileOfType(r.b))
		tech := plan.Primary().Technique
		tl := byTech[tech]
		if tl == nil {
			tl = &tally{}
			byTech[tech] = tl
		}
		tl.runs++
		switch {
		case r.err != nil:
			tl.failed++
			t.Errorf("%s → %s (seed %d): did not connect: %v", r.a, r.b, r.seed, r.err)
		case r.method == MethodRelayed:
			tl.relayed++
		default:
			tl.directOK++
			tl.times = append(tl.times, r.direct)
		}
		if plan.DirectCapable() {
			capable++
			if r.err == nil && r.method != MethodRelayed {
				capableOK++
			}
		} else {
			relayOnly++
			if r.err == nil && r.method == MethodRelayed {
				relayOnlyRelayed++
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-10s %5s %8s %8s %7s %12s\n", "technique", "runs", "direct", "relayed", "failed", "median→direct")
	techs := make([]nat.Technique, 0, len(byTech))
	for k := range byTech {
		techs = append(techs, k)
	}
	sort.Slice(techs, func(i, j int) bool { return techs[i] < techs[j] })
	for _, k := range techs {
		tl := byTech[k]
		sort.Slice(tl.times, func(i, j int) bool { return tl.times[i] < tl.times[j] })
		med := time.Duration(0)
		if len(tl.times) > 0 {
			med = tl.times[len(tl.times)/2]
		}
		fmt.Fprintf(&sb, "%-10s %5d %8d %8d %7d %12v\n", k, tl.runs, tl.directOK, tl.relayed, tl.failed, med.Round(time.Microsecond))
	}
	fmt.Fprintf(&sb, "direct-capable: %d/%d direct (%.1f%%); relay-only: %d/%d relayed; %d runs in %v\n",
		capableOK, capable, 100*float64(capableOK)/float64(max(capable, 1)), relayOnlyRelayed, relayOnly, len(results), elapsed.Round(time.Millisecond))
	t.Log(sb.String())

	dir := os.Getenv("PEERLINK_MATRIX_CSV")
	if dir == "" {
		dir = t.TempDir()
	}
	path := filepath.Join(dir, "connect-matrix.csv")
	if f, err := os.Create(path); err == nil {
		cw := csv.NewWriter(f)
		cw.Write([]string{"initiator", "responder", "seed", "plan", "technique", "method", "first_path_ms", "to_direct_ms", "error"})
		for _, r := range results {
			e := ""
			if r.err != nil {
				e = r.err.Error()
			}
			cw.Write([]string{r.a.String(), r.b.String(), fmt.Sprint(r.seed), nat.Strategy(profileOfType(r.a), profileOfType(r.b)).String(), r.technique.String(), r.method.String(),
				fmt.Sprintf("%.2f", float64(r.first.Microseconds())/1000), fmt.Sprintf("%.2f", float64(r.direct.Microseconds())/1000), e})
		}
		cw.Flush()
		f.Close()
		t.Logf("matrix CSV: %s", path)
	}

	if 100*capableOK < 95*capable {
		t.Errorf("direct-capable pairs: %d of %d ended direct or punched, want at least 95%%", capableOK, capable)
	}
	if relayOnlyRelayed != relayOnly {
		t.Errorf("relay-only pairs: %d of %d ended relayed", relayOnlyRelayed, relayOnly)
	}
}

func profileOfType(t nat.Type) nat.Profile {
	return nat.Profile{Mapping: t.Mapping, Filtering: t.Filtering, Allocation: t.Allocation, PortDelta: 1}
}
