package benchrun

import (
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	tests := []struct {
		name       string
		line       string
		user, sys  time.Duration
		wantErrBad bool
	}{
		{"plain", "1234 (peerlink) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 100 0 0",
			2500 * time.Millisecond, 750 * time.Millisecond, false},
		{"name with spaces and parentheses", "77 (a) b (c)) R 1 77 77 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 5",
			30 * time.Millisecond, 40 * time.Millisecond, false},
		{"zero", "1 (init) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1", 0, 0, false},
		{"no parenthesis", "1 init S 0 1 1 0 -1 0 0 0 0 0 0 0", 0, 0, true},
		{"truncated", "1 (init) S 0 1 1 0 -1 0 0 0 0 0 5", 0, 0, true},
		{"not a number", "1 (init) S 0 1 1 0 -1 0 0 0 0 0 x 4 0", 0, 0, true},
		{"negative", "1 (init) S 0 1 1 0 -1 0 0 0 0 0 -3 4 0", 0, 0, true},
		{"overflows a Duration", "1 (init) S 0 1 1 0 -1 0 0 0 0 0 9223372036854775807 4 0", 0, 0, true},
		{"empty", "", 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, s, err := ParseStat([]byte(tt.line))
			if tt.wantErrBad {
				if !errors.Is(err, ErrBadStat) {
					t.Fatalf("ParseStat = %v, %v, %v; want ErrBadStat", u, s, err)
				}
				return
			}
			if err != nil || u != tt.user || s != tt.sys {
				t.Fatalf("ParseStat = %v, %v, %v; want %v, %v", u, s, err, tt.user, tt.sys)
			}
		})
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte("1234 (peerlink) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 100 0 0"))
	f.Add([]byte("77 (a) b (c)) R 1 77 77 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 5"))
	f.Add([]byte(")"))
	f.Fuzz(func(t *testing.T, b []byte) {
		u, s, err := ParseStat(b)
		if err == nil && (u < 0 || s < 0) {
			t.Fatalf("negative times %v, %v", u, s)
		}
		if err != nil && (u != 0 || s != 0) {
			t.Fatalf("error %v with times %v, %v", err, u, s)
		}
	})
}

// TestCPUTimeOfThisProcess: after this process has spent CPU (as the kernel's own
// accounting, getrusage, says), /proc reports at least about as much, and never less
// later on.
func TestCPUTimeOfThisProcess(t *testing.T) {
	before, err := CPUTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	var ru syscall.Rusage
	for x := 0; ; x++ {
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			t.Fatal(err)
		}
		if time.Duration(ru.Utime.Nano()+ru.Stime.Nano()) > 100*time.Millisecond+before {
			break
		}
	}
	after, err := CPUTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// /proc counts in 10 ms ticks and getrusage more finely: allow two ticks.
	if after < before || after < 100*time.Millisecond+before-20*time.Millisecond {
		t.Fatalf("CPU time %v then %v after spending over 100ms", before, after)
	}
}

func TestCPUTimeNoProcess(t *testing.T) {
	// Above the kernel's pid_max limit (4194304), so never a live process.
	if _, err := CPUTime(1 << 23); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("CPUTime of no process = %v, want ErrNotExist", err)
	}
	if _, err := RSS(1 << 23); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("RSS of no process = %v, want ErrNotExist", err)
	}
}

func TestRSSGrows(t *testing.T) {
	before, err := RSS(os.Getpid())
	if err != nil || before <= 0 {
		t.Fatalf("RSS = %d, %v", before, err)
	}
	// 64 MiB touched page by page is resident until it is collected.
	b := make([]byte, 64<<20)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	after, err := RSS(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after-before < 32<<20 {
		t.Fatalf("RSS %d then %d after touching 64 MiB", before, after)
	}
	_ = b[len(b)-1]
}
