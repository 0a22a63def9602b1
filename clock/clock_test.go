package clock

import (
	"testing"
	"time"
)

func TestFakeRunsTimersInOrder(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := NewFake(start)
	var got []time.Duration
	record := func() { got = append(got, c.Now().Sub(start)) }
	c.AfterFunc(3*time.Second, record)
	c.AfterFunc(1*time.Second, func() {
		record()
		c.AfterFunc(1*time.Second, record) // scheduled from a timer: fires at 2s
	})
	stopped := c.AfterFunc(2500*time.Millisecond, record)
	if !stopped.Stop() || stopped.Stop() {
		t.Fatal("Stop should report true once, then false")
	}
	c.Advance(2 * time.Second)
	if want := []time.Duration{time.Second, 2 * time.Second}; len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("after 2s fired at %v, want %v", got, want)
	}
	c.Advance(time.Second)
	if len(got) != 3 || got[2] != 3*time.Second {
		t.Fatalf("after 3s fired at %v", got)
	}
	if c.Pending() != 0 || !c.Now().Equal(start.Add(3*time.Second)) {
		t.Fatalf("pending %d now %v", c.Pending(), c.Now())
	}
}

func TestOr(t *testing.T) {
	if _, ok := Or(nil).(Real); !ok {
		t.Error("Or(nil) is not Real")
	}
	f := NewFake(time.Time{})
	if Or(f) != Clock(f) {
		t.Error("Or(f) is not f")
	}
}
