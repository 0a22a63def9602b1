package punch_test

import (
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"peerlink/nat"
	"peerlink/punch"
)

// matrixRow is one run of one ordered pair of NAT types.
type matrixRow struct {
	a, b     nat.Type
	seed     uint64
	delta    int
	step     nat.Step
	capable  bool // the plan expects a direct path
	ok       bool
	method   string // direct, punched, relay (not attempted) or failed
	elapsed  time.Duration
	attempts int
	err      string
}

// matrixSeeds is how many seeds each ordered pair runs with; PUNCH_SEEDS overrides it.
func matrixSeeds(t *testing.T) int {
	if s := os.Getenv("PUNCH_SEEDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("PUNCH_SEEDS=%q: want a positive number", s)
		}
		return n
	}
	return 3
}

// TestMatrix runs every ordered pair of the 27 NATCracker types, with several seeds (and
// port deltas for contiguous allocators), through the emulator: every pair the strategy
// marks direct-capable must end with a path that carries data both ways in at least 95%
// of its runs, counting both orders; relay-only pairs must not be attempted. It logs the
// matrix and a summary per technique and writes every run to a CSV file (under
// PUNCH_MATRIX_CSV if set, else a temporary directory).
func TestMatrix(t *testing.T) {
	seeds := matrixSeeds(t)
	types := nat.AllTypes()
	deltas := []int{1, 3, -2}

	type job struct {
		i, j int
		seed uint64
	}
	jobs := make(chan job)
	rows := make([]matrixRow, 0, len(types)*len(types)*seeds)
	var mu sync.Mutex
	var wg sync.WaitGroup
	began := time.Now()
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for jb := range jobs {
				r := runMatrixPair(types[jb.i], types[jb.j], jb.seed, deltas[int(jb.seed)%len(deltas)])
				mu.Lock()
				rows = append(rows, r)
				mu.Unlock()
			}
		}()
	}
	for s := range seeds {
		for i := range types {
			for j := range types {
				jobs <- job{i, j, uint64(s + 1)}
			}
		}
	}
	close(jobs)
	wg.Wait()
	total := time.Since(began)

	slices.SortFunc(rows, func(x, y matrixRow) int {
		if c := strings.Compare(x.a.String(), y.a.String()); c != 0 {
			return c
		}
		if c := strings.Compare(x.b.String(), y.b.String()); c != 0 {
			return c
		}
		return int(x.seed) - int(y.seed)
	})
	writeMatrixCSV(t, rows)
	t.Logf("%d runs of %d ordered pairs in %v\n%s\n%s", len(rows), len(types)*len(types), total.Round(time.Millisecond), matrixGrid(types, rows), matrixSummary(rows))

	// Per unordered pair, both orders together.
	type pairKey struct{ a, b nat.Type }
	key := func(r matrixRow) pairKey {
		if strings.Compare(r.a.String(), r.b.String()) > 0 {
			return pairKey{r.b, r.a}
		}
		return pairKey{r.a, r.b}
	}
	type tally struct {
		capable, relay bool
		runs, ok       int
		errs           []string
	}
	pairs := map[pairKey]*tally{}
	for _, r := range rows {
		k := key(r)
		tl := pairs[k]
		if tl == nil {
			tl = &tally{}
			pairs[k] = tl
		}
		if r.capable {
			tl.capable = true
			tl.runs++
			if r.ok {
				tl.ok++
			} else {
				tl.errs = append(tl.errs, fmt.Sprintf("%s→%s seed %d %v: %s", r.a, r.b, r.seed, r.step, r.err))
			}
		} else {
			tl.relay = true
			if r.method != "relay" {
				t.Errorf("%s→%s: relay-only pair: %s", r.a, r.b, r.err)
			}
		}
	}
	capable, relay := 0, 0
	for k, tl := range pairs {
		if tl.capable && tl.relay {
			t.Errorf("%s↔%s: direct-capable in one order only", k.a, k.b)
		}
		if tl.relay {
			relay++
			continue
		}
		capable++
		// A handful of runs per pair cannot show 95% exactly: a pair fails when its
		// failures would be this many less than 1% of the time at a 95% success rate.
		// Each technique's runs together must reach 95% outright (below).
		if fails := tl.runs - tl.ok; fails > 0 && binomialTail(tl.runs, fails, 0.05) < 0.01 {
			t.Errorf("%s↔%s: %d of %d runs found a path, not consistent with ≥95%%:\n  %s", k.a, k.b, tl.ok, tl.runs, strings.Join(tl.errs, "\n  "))
		} else if fails > 0 {
			t.Logf("%s↔%s: %d of %d runs found a path (within chance at ≥95%%):\n  %s", k.a, k.b, tl.ok, tl.runs, strings.Join(tl.errs, "\n  "))
		}
	}
	byTechnique := map[string][2]int{}
	for _, r := range rows {
		if r.capable {
			v := byTechnique[r.step.Technique.String()]
			v[0]++
			if r.ok {
				v[1]++
			}
			byTechnique[r.step.Technique.String()] = v
		}
	}
	for tech, v := range byTechnique {
		if float64(v[1]) < 0.95*float64(v[0]) {
			t.Errorf("%s: %d of %d runs found a path, want ≥95%%", tech, v[1], v[0])
		}
	}
	if len(pairs) != 378 || capable != 332 || relay != 46 {
		t.Errorf("%d unordered pairs, %d direct-capable, %d relay-only; want 378, 332, 46", len(pairs), capable, relay)
	}
}

// runMatrixPair runs initiator type a against responder type b once.
func runMatrixPair(a, b nat.Type, seed uint64, delta int) matrixRow {
	row := matrixRow{a: a, b: b, seed: seed, delta: delta, method: "failed"}
	fail := func(err error) matrixRow {
		row.err = err.Error()
		return row
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w, err := newWorld(seed)
	if err != nil {
		return fail(err)
	}
	defer w.close()
	pa, err := w.addPeer(ctx, "a", peerOpts{typ: a, delta: delta, natIP: natIPA, hostIP: hostIPA, cfg: fast})
	if err != nil {
		return fail(err)
	}
	pb, err := w.addPeer(ctx, "b", peerOpts{typ: b, delta: delta, natIP: natIPB, hostIP: hostIPB, cfg: fast})
	if err != nil {
		return fail(err)
	}
	plan := nat.Strategy(pa.profile, pb.profile)
	row.step, row.capable = plan.Primary(), plan.DirectCapable()
	if !row.capable {
		// The connector relays without trying; the engine refuses the step anyway.
		session, key := newSession()
		_, _, err := pa.eng.Prepare(ctx, punch.Setup{Session: session, Key: key, Step: row.step, Self: nat.SideA, Local: pa.profile, Remote: pb.profile, Main: pa.main})
		if !errors.Is(err, punch.ErrNotPunchable) {
			return fail(fmt.Errorf("Prepare(%v) = %v, want ErrNotPunchable", row.step, err))
		}
		row.method = "relay"
		return row
	}
	out, err := runPair(ctx, pa, pb, row.step, runOpts{})
	if err != nil {
		return fail(err)
	}
	row.elapsed = out.elapsed
	row.attempts = max(out.resA.Attempts, out.resB.Attempts)
	if !out.ok() {
		return fail(out.err())
	}
	row.ok = true
	row.method = "punched"
	if t := row.step.Technique; t == nat.Direct || t == nat.Reversal {
		row.method = "direct"
	}
	return row
}

var techCode = map[nat.Technique]string{
	nat.Direct: "D", nat.Reversal: "R", nat.SimplePunch: "S", nat.PredictPreservation: "P",
	nat.PredictContiguity: "C", nat.PredictPreservationBoth: "PP", nat.PredictContiguityBoth: "CC",
	nat.PredictMixed: "PC", nat.Birthday: "B", nat.Relay: "·",
}

// matrixGrid draws initiator types as rows and responder types as columns; a cell is
// the technique's code and how many runs found a path.
func matrixGrid(types []nat.Type, rows []matrixRow) string {
	type cell struct {
		step nat.Step
		ok   int
	}
	cells := map[[2]nat.Type]*cell{}
	for _, r := range rows {
		c := cells[[2]nat.Type{r.a, r.b}]
		if c == nil {
			c = &cell{step: r.step}
			cells[[2]nat.Type{r.a, r.b}] = c
		}
		if r.ok {
			c.ok++
		}
	}
	var sb strings.Builder
	sb.WriteString("initiator \\ responder (D direct, R reversal, S shp, P prp, C prc, PP prp-prp, CC prc-prc, PC prp-prc, B birthday, · relay; digit: runs with a path)\n")
	fmt.Fprintf(&sb, "%-9s", "")
	for i := range types {
		fmt.Fprintf(&sb, "%4d", i+1)
	}
	sb.WriteString("\n")
	for i, a := range types {
		fmt.Fprintf(&sb, "%2d %-6s", i+1, strings.ReplaceAll(a.String(), "-", ""))
		for _, b := range types {
			c := cells[[2]nat.Type{a, b}]
			s := techCode[c.step.Technique]
			if c.step.Technique != nat.Relay {
				s += strconv.Itoa(c.ok)
			}
			fmt.Fprintf(&sb, "%4s", s)
		}
		sb.WriteString("\n")
	}
	return sb.String()
}

// matrixSummary tabulates runs by technique: success rate and time to a path.
func matrixSummary(rows []matrixRow) string {
	type agg struct {
		runs, ok, retried int
		times             []time.Duration
	}
	by := map[nat.Technique]*agg{}
	for _, r := range rows {
		g := by[r.step.Technique]
		if g == nil {
			g = &agg{}
			by[r.step.Technique] = g
		}
		g.runs++
		if r.ok {
			g.ok++
			g.times = append(g.times, r.elapsed)
			if r.attempts > 1 {
				g.retried++
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "%-9s %5s %5s %7s %9s %9s %9s %8s\n", "technique", "runs", "path", "rate", "median", "p95", "max", "retried")
	for t := nat.Local; t <= nat.Relay; t++ {
		g := by[t]
		if g == nil {
			continue
		}
		if t == nat.Relay {
			fmt.Fprintf(&sb, "%-9s %5d %5s %7s (not attempted: relayed)\n", t, g.runs, "-", "-")
			continue
		}
		slices.Sort(g.times)
		q := func(f float64) string {
			if len(g.times) == 0 {
				return "-"
			}
			return g.times[min(len(g.times)-1, int(f*float64(len(g.times))))].Round(10 * time.Microsecond).String()
		}
		fmt.Fprintf(&sb, "%-9s %5d %5d %6.1f%% %9s %9s %9s %8d\n", t, g.runs, g.ok, 100*float64(g.ok)/float64(g.runs), q(0.5), q(0.95), q(1), g.retried)
	}
	return sb.String()
}

func writeMatrixCSV(t *testing.T, rows []matrixRow) {
	path := os.Getenv("PUNCH_MATRIX_CSV")
	if path == "" {
		path = filepath.Join(t.TempDir(), "matrix.csv")
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := csv.NewWriter(f)
	w.Write([]string{"initiator", "responder", "seed", "delta", "step", "direct_capable", "method", "ok", "elapsed_ms", "attempts", "error"})
	for _, r := range rows {
		w.Write([]string{
			r.a.String(), r.b.String(), strconv.FormatUint(r.seed, 10), strconv.Itoa(r.delta), r.step.String(),
			strconv.FormatBool(r.capable), r.method, strconv.FormatBool(r.ok),
			strconv.FormatFloat(float64(r.elapsed)/float64(time.Millisecond), 'f', 3, 64), strconv.Itoa(r.attempts), r.err,
		})
	}
	w.Flush()
	if err := errors.Join(w.Error(), f.Close()); err != nil {
		t.Fatal(err)
	}
	t.Logf("matrix CSV: %s", path)
}

// binomialTail is the probability of at least k failures in n runs that each fail with
// probability p.
func binomialTail(n, k int, p float64) float64 {
	total := 0.0
	for i := k; i <= n; i++ {
		c := 1.0
		for j := range i {
			c = c * float64(n-j) / float64(j+1)
		}
		total += c * math.Pow(p, float64(i)) * math.Pow(1-p, float64(n-i))
	}
	return total
}

func TestBinomialTail(t *testing.T) {
	for _, tt := range []struct {
		n, k int
		want float64
	}{{6, 0, 1}, {6, 1, 0.2649}, {6, 2, 0.0328}, {6, 3, 0.0022}, {6, 7, 0}} {
		if got := binomialTail(tt.n, tt.k, 0.05); math.Abs(got-tt.want) > 0.0001 {
			t.Errorf("binomialTail(%d, %d, 0.05) = %.4f, want %.4f", tt.n, tt.k, got, tt.want)
		}
	}
}
