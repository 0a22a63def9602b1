// Package benchrun holds the pieces of peerlink's one-command benchmark: per-process CPU
// and memory from /proc, medians, parsers for the tools it runs, and the report.
package benchrun

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// ErrBadStat means a /proc/<pid>/stat line could not be read.
var ErrBadStat = errors.New("benchrun: malformed /proc stat line")

// clockTick is USER_HZ, 100 on every Linux architecture Go supports; /proc counts in it.
const clockTick = 100

// ParseStat returns the user and system CPU time in a /proc/<pid>/stat line, all the
// process's threads together (the kernel sums them there).
func ParseStat(b []byte) (user, system time.Duration, err error) {
	// The command name is parenthesised and may itself hold spaces and parentheses: the
	// fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, ErrBadStat
	}
	f := strings.Fields(string(b[i+1:]))
	// utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
	if len(f) < 13 {
		return 0, 0, ErrBadStat
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 63)
	st, err2 := strconv.ParseUint(f[12], 10, 63)
	if err1 != nil || err2 != nil {
		return 0, 0, ErrBadStat
	}
	const maxTicks = uint64(1<<63-1) / uint64(time.Second/clockTick)
	if ut > maxTicks || st > maxTicks {
		return 0, 0, ErrBadStat
	}
	return time.Duration(ut) * (time.Second / clockTick), time.Duration(st) * (time.Second / clockTick), nil
}

// CPUTime is process pid's user plus system time so far, read from /proc/<pid>/stat:
// only that process, however busy the rest of the machine is.
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	u, s, err := ParseStat(b)
	if err != nil {
		return 0, fmt.Errorf("pid %d: %w", pid, err)
	}
	return u + s, nil
}

// RSS is process pid's resident set size in bytes, from /proc/<pid>/status.
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				break
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("pid %d: no VmRSS in /proc status", pid)
}

// LoadAverage is the machine's 1-minute load average, 0 if unknown.
func LoadAverage() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}
