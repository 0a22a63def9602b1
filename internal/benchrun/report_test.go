package benchrun

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"time"
)

func sampleReport() *Report {
	r := &Report{Started: time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC), Seconds: 600,
		Machine: Machine{CPU: "Test CPU", Cores: 2, Kernel: "6.1", Go: "go1.26"}}
	r.Note("stun", "32 sockets x 16")
	r.Add("stun", "peerlink", "req/s", []float64{200, 100, 300}, nil)
	r.Add("stun", "peerlink/coturn", "x req/CPU-s", []float64{1.4, 1.6, 1.7}, AtLeast(1.5))
	r.Add("profiling", "fresh detection", "ms", []float64{450, 470, 460}, Below(400))
	r.Add("profiling", "cache hit", "ns", []float64{math.NaN()}, Below(1000))
	r.Problem("connect", errors.New("the kernel lab needs root"))
	return r
}

func TestReportTargets(t *testing.T) {
	r := sampleReport()
	want := map[string]bool{"peerlink/coturn": true, "fresh detection": false, "cache hit": false}
	for _, f := range r.Figures {
		if f.Target == nil {
			continue
		}
		if f.Target.Pass != want[f.Name] {
			t.Errorf("%s: median %v, target %v: pass = %v", f.Name, f.Median, f.Target, f.Target.Pass)
		}
	}
	if m := r.Missed(); len(m) != 2 {
		t.Errorf("missed %d figures, want 2 (a figure without samples misses)", len(m))
	}
}

// TestReportTable is a smoke test of the rendering: every figure, target, note and
// problem is in the table.
func TestReportTable(t *testing.T) {
	var buf bytes.Buffer
	if err := sampleReport().WriteTable(&buf); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, s := range []string{
		"Test CPU, 2 cores, Linux 6.1, go1.26, coturn not installed",
		"stun: 32 sockets x 16",
		"section", "median", "target",
		"peerlink  ", "200  ", "100  ", "300  ", "req/s",
		"≥ 1.50  pass",
		"< 400  MISS",
		"connect: the kernel lab needs root",
		"cache hit        -       -     -     ns           0", // no samples: dashes, not zeros
		"missed: profiling fresh detection, profiling cache hit",
	} {
		if !strings.Contains(out, s) {
			t.Errorf("table lacks %q:\n%s", s, out)
		}
	}
}

func TestReportJSON(t *testing.T) {
	var buf bytes.Buffer
	if err := sampleReport().WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(buf.Bytes(), &back); err != nil {
		t.Fatalf("JSON does not decode: %v\n%s", err, buf.String())
	}
	if len(back.Figures) != 4 || back.Figures[0].Median != 200 || back.Figures[0].N != 3 || back.Figures[0].Min != 100 {
		t.Fatalf("figures came back as %+v", back.Figures)
	}
	if f := back.Figures[2]; f.Target == nil || f.Target.Op != "<" || f.Target.Value != 400 || f.Target.Pass {
		t.Fatalf("target came back as %+v", f.Target)
	}
	if back.Problems["connect"] == "" || back.Machine.CPU != "Test CPU" {
		t.Fatalf("problems or machine lost: %+v", back)
	}
}

func TestFormatNumber(t *testing.T) {
	tests := []struct {
		in   float64
		want string
	}{{0, "0"}, {123456.7, "123457"}, {12.34, "12.3"}, {1.234, "1.23"}, {0.01234, "0.0123"}, {-150, "-150"}}
	for _, tt := range tests {
		if got := formatNumber(tt.in); got != tt.want {
			t.Errorf("formatNumber(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestThisMachine(t *testing.T) {
	m := ThisMachine()
	if m.Cores < 1 || m.Kernel == "" || !strings.HasPrefix(m.Go, "go") {
		t.Fatalf("ThisMachine = %+v", m)
	}
}
