package benchrun

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Target is what a figure should reach: its median Op Value.
type Target struct {
	Op    string  `json:"op"` // ">=" or "<"
	Value float64 `json:"value"`
	Pass  bool    `json:"pass"`
}

// String is the target as the table shows it.
func (t Target) String() string {
	op := "≥"
	if t.Op == "<" {
		op = "<"
	}
	return op + " " + formatNumber(t.Value)
}

// Figure is one measured quantity: its samples, one per run, and their summary.
type Figure struct {
	Section string    `json:"section"`
	Name    string    `json:"name"`
	Unit    string    `json:"unit"`
	Samples []float64 `json:"samples"`
	Summary
	Target *Target `json:"target,omitempty"`
}

// Report is a whole benchmark run.
type Report struct {
	Machine  Machine           `json:"machine"`
	Started  time.Time         `json:"started"`
	Seconds  float64           `json:"seconds"`
	Quick    bool              `json:"quick"`
	Load     [2]float64        `json:"loadAverage"`        // 1-minute load average at start and end: other work skews figures
	Notes    map[string]string `json:"notes,omitempty"`    // by section: how it was measured
	Figures  []Figure          `json:"figures"`            //
	Problems map[string]string `json:"problems,omitempty"` // by section: why it has no or fewer figures
}

// Add records a figure from its samples, NaNs and infinities dropped (JSON has none);
// target, if not nil, is checked against the median (a figure without samples misses).
func (r *Report) Add(section, name, unit string, samples []float64, target *Target) {
	samples = slices.DeleteFunc(slices.Clone(samples), func(x float64) bool { return math.IsNaN(x) || math.IsInf(x, 0) })
	f := Figure{Section: section, Name: name, Unit: unit, Samples: samples, Summary: Summarize(samples)}
	if target != nil {
		t := *target
		t.Pass = f.N > 0 && (t.Op == "<" && f.Median < t.Value || t.Op != "<" && f.Median >= t.Value)
		f.Target = &t
	}
	r.Figures = append(r.Figures, f)
}

// AtLeast and Below make targets for Add.
func AtLeast(v float64) *Target { return &Target{Op: ">=", Value: v} }

// Below is a target the median must stay under.
func Below(v float64) *Target { return &Target{Op: "<", Value: v} }

// Note records how a section was measured.
func (r *Report) Note(section, format string, args ...any) {
	if r.Notes == nil {
		r.Notes = map[string]string{}
	}
	r.Notes[section] = fmt.Sprintf(format, args...)
}

// Problem records why a section has no or fewer figures.
func (r *Report) Problem(section string, err error) {
	if r.Problems == nil {
		r.Problems = map[string]string{}
	}
	if p := r.Problems[section]; p != "" {
		r.Problems[section] = p + "; " + err.Error()
		return
	}
	r.Problems[section] = err.Error()
}

// Missed lists the figures that missed their targets.
func (r *Report) Missed() []Figure {
	var m []Figure
	for _, f := range r.Figures {
		if f.Target != nil && !f.Target.Pass {
			m = append(m, f)
		}
	}
	return m
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(r)
}

// WriteTable writes the report as one aligned table, the machine and notes above it and
// the problems below.
func (r *Report) WriteTable(w io.Writer) error {
	m := r.Machine
	fmt.Fprintf(w, "peerlink bench, %s: %s, %d cores, Linux %s, %s, coturn %s; took %s%s; load average %.1f at start, %.1f at end\n",
		r.Started.UTC().Format("2006-01-02 15:04 MST"), m.CPU, m.Cores, m.Kernel, m.Go, orNone(m.Coturn),
		(time.Duration(r.Seconds) * time.Second).String(), map[bool]string{true: " (quick)"}[r.Quick], r.Load[0], r.Load[1])
	for _, s := range r.sections() {
		if n := r.Notes[s]; n != "" {
			fmt.Fprintf(w, "  %s: %s\n", s, n)
		}
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "section\tfigure\tmedian\tmin\tmax\tunit\truns\ttarget\t")
	for _, f := range r.Figures {
		target := ""
		if f.Target != nil {
			target = f.Target.String() + map[bool]string{true: "  pass", false: "  MISS"}[f.Target.Pass]
		}
		med, lo, hi := formatNumber(f.Median), formatNumber(f.Min), formatNumber(f.Max)
		if f.N == 0 {
			med, lo, hi = "-", "-", "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t\n", f.Section, f.Name, med, lo, hi, f.Unit, f.N, target)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, s := range r.sections() {
		if p := r.Problems[s]; p != "" {
			fmt.Fprintf(w, "%s: %s\n", s, p)
		}
	}
	if miss := r.Missed(); len(miss) > 0 {
		names := make([]string, len(miss))
		for i, f := range miss {
			names[i] = f.Section + " " + f.Name
		}
		fmt.Fprintf(w, "missed: %s\n", strings.Join(names, ", "))
	}
	_, err := fmt.Fprintln(w)
	return err
}

// sections lists the sections in the order their figures came, then any others.
func (r *Report) sections() []string {
	var out []string
	seen := map[string]bool{}
	add := func(s string) {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	for _, f := range r.Figures {
		add(f.Section)
	}
	for _, m := range []map[string]string{r.Notes, r.Problems} {
		for _, s := range slices.Sorted(maps.Keys(m)) {
			add(s)
		}
	}
	return out
}

func orNone(s string) string {
	if s == "" {
		return "not installed"
	}
	return s
}

// formatNumber shows about three significant figures, whole numbers from 100 up.
func formatNumber(v float64) string {
	a := math.Abs(v)
	switch {
	case v == 0:
		return "0"
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

// Machine describes where the figures were measured.
type Machine struct {
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
	Coturn string `json:"coturn,omitempty"`
}

// ThisMachine reads the CPU model, core count and kernel from /proc, the Go version
// from the go command that builds the benchmark, and coturn's version if installed.
func ThisMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("go", "env", "GOVERSION").Output(); err == nil {
		m.Go = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command("turnserver", "--version").Output(); err == nil {
		m.Coturn = strings.TrimSpace(string(out))
	}
	return m
}
