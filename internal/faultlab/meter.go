package faultlab

import (
	"sync"
	"time"
)

// Gap is a stretch of time in which a Meter saw no bytes.
type Gap struct {
	From, To time.Time
}

// Len is the gap's length.
func (g Gap) Len() time.Duration { return g.To.Sub(g.From) }

// Meter is an io.Writer that counts what a transfer delivers and remembers the gaps in
// it: a fault shows up as a stall in the receiver's bytes, and how long that stall lasts
// is the recovery time the tests report.
//
// The zero value is ready to use; MinGap zero means 100 ms.
type Meter struct {
	// MinGap is the shortest silence recorded as a gap.
	MinGap time.Duration

	mu    sync.Mutex
	n     int64
	first time.Time
	last  time.Time
	gaps  []Gap
	now   func() time.Time // nil means time.Now (tests set it)
}

func (m *Meter) clock() time.Time {
	if m.now != nil {
		return m.now()
	}
	return time.Now()
}

// Write counts b; it never fails.
func (m *Meter) Write(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	now := m.clock()
	m.mu.Lock()
	defer m.mu.Unlock()
	min := m.MinGap
	if min <= 0 {
		min = 100 * time.Millisecond
	}
	switch {
	case m.first.IsZero():
		m.first = now
	case now.Sub(m.last) >= min:
		m.gaps = append(m.gaps, Gap{From: m.last, To: now})
	}
	m.last = now
	m.n += int64(len(b))
	return len(b), nil
}

// Bytes is how many bytes were written.
func (m *Meter) Bytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.n
}

// Last is when the latest bytes came (zero before any).
func (m *Meter) Last() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.last
}

// Gaps returns the recorded gaps, oldest first. A silence still going on is not among
// them; Last tells when it began.
func (m *Meter) Gaps() []Gap {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Gap(nil), m.gaps...)
}

// MaxGap is the longest recorded gap (zero when there is none).
func (m *Meter) MaxGap() Gap {
	var longest Gap
	for _, g := range m.Gaps() {
		if g.Len() > longest.Len() {
			longest = g
		}
	}
	return longest
}

// ResumedAfter returns the first time bytes came after t, and false when none have yet.
func (m *Meter) ResumedAfter(t time.Time) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.last.After(t) {
		return time.Time{}, false
	}
	for _, g := range m.gaps {
		if !g.From.After(t) && g.To.After(t) {
			return g.To, true
		}
	}
	// No gap spans t: bytes kept coming within MinGap of it.
	return t, true
}
