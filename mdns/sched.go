package mdns

import (
	"math/rand/v2"
	"sync"
	"time"

	"peerlink/clock"
)

// scheduler runs callbacks on a clock and, on close, stops those pending and waits for
// those running, so an owner's Close can promise that no callback outlives it.
type scheduler struct {
	clk clock.Clock

	mu     sync.Mutex
	closed bool
	next   int
	timers map[int]clock.Timer
	wg     sync.WaitGroup
}

func newScheduler(c clock.Clock) *scheduler {
	return &scheduler{clk: clock.Or(c), timers: map[int]clock.Timer{}}
}

// after runs f once d has passed, unless the scheduler is closed first.
func (s *scheduler) after(d time.Duration, f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	id := s.next
	s.next++
	s.wg.Add(1)
	s.timers[id] = s.clk.AfterFunc(d, func() {
		defer s.wg.Done()
		s.mu.Lock()
		delete(s.timers, id)
		closed := s.closed
		s.mu.Unlock()
		if !closed {
			f()
		}
	})
}

func (s *scheduler) close() {
	s.mu.Lock()
	s.closed = true
	for id, t := range s.timers {
		if t.Stop() {
			s.wg.Done()
		}
		delete(s.timers, id)
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// jitter returns a uniformly random duration in [lo, hi).
func jitter(lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + rand.N(hi-lo)
}
