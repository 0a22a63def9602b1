package faultlab

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/netlab"
)

// relayResume bounds how long after the restarted relay is up again a relayed
// connection carries data and a new relayed Connect works. What it takes: 3 s of
// silence on the relayed path (PathCheck.Timeout) before the node checks its
// allocation, one check answered "unknown allocation" by the new relay, a new
// allocation, a candidate message to the peer and its pings through the new relay;
// about 4 s in the lab. The rest is room for QUIC's backed-off retransmission and a
// loaded two-core machine under the race detector.
const relayResume = 10 * time.Second

// idleResume bounds when two nodes that had no connection during the restart can
// connect over the relay again. Nothing tells such a node its allocation died until
// a Connect's relay pings go unanswered for PathCheck.Timeout (3 s): the node then has
// its allocation checked, finds it unknown to the new relay, allocates again and tells
// the peer; about 3 s in the lab, within one Connect's default timeout. The rest is
// room for a loaded machine under the race detector.
const idleResume = 10 * time.Second

// connectProbe is the outcome of connecting a to b from a moment on, attempt after
// attempt, until one carries datagrams both ways.
type connectProbe struct {
	took     time.Duration // from the start until an attempt had carried datagrams; Never if none
	attempts int
	first    error // the first attempt's error, nil when it worked
	last     error // the last failed attempt's error
}

func (p connectProbe) note() string {
	s := fmt.Sprintf("attempts %d", p.attempts)
	if p.first != nil {
		s += ", first: " + p.first.Error()
	}
	if p.took < 0 && p.last != nil {
		s += ", last: " + p.last.Error()
	}
	return s
}

// probeConnect connects a to b over and over from from until one attempt carries
// datagrams both ways or until is over; each attempt gets at most 5 s (a relayed
// Connect in the lab takes well under 1 s).
func probeConnect(a, b *node, from time.Time, until time.Duration) connectProbe {
	p := connectProbe{took: Never}
	for deadline := from.Add(until); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		p.attempts++
		ca, cb, err := connectPair(context.Background(), a, b, 5*time.Second)
		if err == nil {
			ok := ping(ca, cb) && ping(cb, ca)
			ca.Close()
			cb.Close()
			if ok {
				p.took = time.Since(from)
				return p
			}
			err = errNoData
		}
		if p.first == nil {
			p.first = err
		}
		p.last = err
	}
	return p
}

// TestRelayRestart kills the TURN relay and starts it again on the same ports while a
// relayed transfer runs between two symmetric NATs, where only the relay works, and a
// punched one between two port-restricted NATs. The punched transfer must not stall
// for 2 s (unaffectedStall). The relayed one must carry data again within 10 s of the
// relay being back (the nodes find their allocations lost, allocate again and
// re-confirm the path) and arrive intact; a new relayed Connect between the same nodes
// must work within the same 10 s; and two symmetric nodes that had no connection
// during the restart must connect within 20 s (their allocations are checked every
// 15 s).
func TestRelayRestart(t *testing.T) {
	t.Parallel()
	w := startWorld(t, true,
		netlab.SiteConfig{Name: "pr-1", Kind: netlab.KindPortRestricted}, netlab.SiteConfig{Name: "pr-2", Kind: netlab.KindPortRestricted},
		netlab.SiteConfig{Name: "sym-1", Kind: netlab.KindSymmetric}, netlab.SiteConfig{Name: "sym-2", Kind: netlab.KindSymmetric},
		netlab.SiteConfig{Name: "sym-3", Kind: netlab.KindSymmetric}, netlab.SiteConfig{Name: "sym-4", Kind: netlab.KindSymmetric})
	n := w.nodes(t, "pr-1", "pr-2", "sym-1", "sym-2", "sym-3", "sym-4")
	pa, pb := pair(t, n["pr-1"], n["pr-2"], connect.MethodPunched)
	ra, rb := pair(t, n["sym-1"], n["sym-2"], connect.MethodRelayed)

	// 256 KiB/s each: the punched flow runs 4 s, across the restart; the relayed one
	// until it has carried data again for a second, or the wait for that is over.
	const rate = 256 << 10
	punched := startFlow("punched", pa, pb, 4*rate, rate, 1)
	relayed := startFlow("relayed", ra, rb, 1<<30, rate, 2)
	time.Sleep(time.Second)
	if relayed.meter.Bytes() == 0 || punched.meter.Bytes() == 0 {
		t.Fatalf("nothing flowed before the restart: relayed %d, punched %d bytes", relayed.meter.Bytes(), punched.meter.Bytes())
	}
	killed := time.Now()
	up := w.relay.restart()
	back := time.Now()
	t.Logf("relay killed and started again on %s; it allocated %v after the kill", w.relay.addr, up.Round(time.Millisecond))

	// From the moment the relay is back: new Connects between the nodes of the broken
	// relayed connection, and between nodes that had none.
	var wg sync.WaitGroup
	var busy, idle connectProbe
	wg.Go(func() { busy = probeConnect(n["sym-1"], n["sym-2"], back, relayResume) })
	wg.Go(func() { idle = probeConnect(n["sym-3"], n["sym-4"], back, idleResume) })

	var rows []Row
	perr := punched.wait(30 * time.Second)
	pgap := punched.meter.MaxGap()
	rows = append(rows, Row{Fault: "relay restart", Survived: survived("punched transfer", perr == nil && pgap.Len() < unaffectedStall), Recovery: 0,
		Note: "longest stall " + pgap.Len().Round(time.Millisecond).String()})

	// The relayed flow: does data come through again, and when?
	resumed := Never
	for deadline := back.Add(relayResume); time.Now().Before(deadline) && len(relayed.done) == 0; time.Sleep(50 * time.Millisecond) {
		if at, ok := relayed.meter.ResumedAfter(back); ok {
			resumed = at.Sub(back)
			break
		}
	}
	if resumed >= 0 {
		time.Sleep(time.Second)
	} else {
		// It will not end by itself before the session's idle timeout: end it.
		ra.Close()
		rb.Close()
	}
	relayed.stop()
	rerr := relayed.wait(20 * time.Second)
	rows = append(rows, Row{Fault: "relay restart", Survived: survived("relayed transfer", rerr == nil && resumed >= 0), Recovery: resumed,
		Note: "after the relay was back; stall " + stallAfter(relayed.meter, killed) + "; methods " + ra.Method().String() + "/" + rb.Method().String()})
	wg.Wait()
	rows = append(rows,
		Row{Fault: "relay restart", Survived: survived("new relayed Connect, nodes of that transfer", busy.took >= 0), Recovery: busy.took, Note: busy.note()},
		Row{Fault: "relay restart", Survived: survived("new relayed Connect, idle nodes", idle.took >= 0), Recovery: idle.took, Note: idle.note()})
	t.Logf("\n%s", Table(rows))

	if perr != nil {
		t.Errorf("punched transfer across the relay restart: %v", perr)
	}
	if pgap.Len() >= unaffectedStall {
		t.Errorf("punched transfer stalled %v during the relay restart, want < %v", pgap.Len(), unaffectedStall)
	}
	if resumed < 0 {
		t.Errorf("the relayed transfer did not resume within %v of the relay being back", relayResume)
	}
	if rerr != nil {
		t.Errorf("relayed transfer across the restart: %v", rerr)
	}
	if busy.took < 0 {
		t.Errorf("no new relayed Connect between the transfer's nodes within %v of the relay being back: %s", relayResume, busy.note())
	}
	if idle.took < 0 {
		t.Errorf("no new relayed Connect between idle nodes begun within %v of the relay being back: %s", idleResume, idle.note())
	}
}
