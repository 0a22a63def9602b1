package faultlab

import (
	"flag"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// The lab tests mostly wait (outages, backoffs, paced transfers), each in a lab of
	// its own: run all of them at once, not GOMAXPROCS (two in CI) at a time, unless
	// -parallel says otherwise.
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		flag.Set("test.parallel", "4")
	}
	goleak.VerifyTestMain(m,
		// pion's deadline timers end a moment after their connection closes.
		goleak.IgnoreTopFunction("github.com/pion/transport/v4/deadline.(*Deadline).Set.func1"),
		// nats-server ends these a moment after Shutdown has returned.
		goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server/ats.Register.func1"),
		goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server.(*fileStore).flushStreamStateLoop"),
	)
}

func TestMeter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	tests := []struct {
		name     string
		writes   []int // milliseconds after t0
		maxGap   time.Duration
		gaps     int
		after    int // ResumedAfter(t0 + after ms)
		resumed  int
		resumeOK bool
	}{
		{"steady", []int{0, 50, 100, 150}, 0, 0, 60, 60, true},
		{"one stall", []int{0, 50, 1050, 1100}, time.Second, 1, 500, 1050, true},
		{"two stalls", []int{0, 300, 350, 2350}, 2 * time.Second, 2, 360, 2350, true},
		{"still stalled", []int{0, 50}, 0, 0, 60, 0, false},
		{"nothing", nil, 0, 0, 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var now time.Time
			m := &Meter{now: func() time.Time { return now }}
			for _, w := range tt.writes {
				now = ms(w)
				m.Write(make([]byte, 10))
			}
			if got := m.Bytes(); got != int64(10*len(tt.writes)) {
				t.Errorf("Bytes = %d", got)
			}
			if got := m.MaxGap().Len(); got != tt.maxGap {
				t.Errorf("MaxGap = %v, want %v", got, tt.maxGap)
			}
			if got := len(m.Gaps()); got != tt.gaps {
				t.Errorf("%d gaps, want %d", got, tt.gaps)
			}
			at, ok := m.ResumedAfter(ms(tt.after))
			if ok != tt.resumeOK || (ok && !at.Equal(ms(tt.resumed))) {
				t.Errorf("ResumedAfter(%d ms) = %v, %v; want %d ms, %v", tt.after, at.Sub(t0), ok, tt.resumed, tt.resumeOK)
			}
		})
	}
}

func TestTable(t *testing.T) {
	out := Table([]Row{
		{Fault: "relay restart", Survived: "punched transfer", Recovery: 1500 * time.Millisecond},
		{Fault: "relay restart", Survived: "nothing relayed", Recovery: Never, Note: "bug"},
	})
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "fault") || !strings.Contains(lines[1], "1.5s") || !strings.Contains(lines[2], "never") {
		t.Fatalf("table:\n%s", out)
	}
	// Columns line up: "survived" starts at the same place on every line.
	col := strings.Index(lines[0], "survived")
	for _, l := range lines[1:] {
		if l[col-1] != ' ' || l[col] == ' ' {
			t.Errorf("column not aligned in %q", l)
		}
	}
}
