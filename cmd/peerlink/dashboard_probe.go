package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"sync"
	"time"
)

// The agent pings each of its connections so that its dashboard can show the path's
// round trip, jitter, loss and quality: the peer's agent echoes every datagram it does
// not recognise as an echo of its own, as it always has for 'peerlink connect'.
const (
	probeInterval = time.Second
	// probeTimeout is when an unanswered ping counts as lost.
	probeTimeout = 3 * time.Second
	// probeWindow is how many recent pings the loss is the share of.
	probeWindow = 20
	probeTag    = "peerlink-ping "
)

// prober sends one connection's pings and reads their echoes. It is safe for
// concurrent use.
type prober struct {
	prefix []byte // probeTag, this prober's nonce and a space

	mu       sync.Mutex
	seq      uint64
	sent     map[uint64]time.Time // unanswered pings
	outcomes []bool               // answered or lost, oldest first
	echoes   int
	srtt     time.Duration
	last     time.Duration
	jitter   time.Duration
}

// pathHealth is what the pings measured.
type pathHealth struct {
	rtt, jitter time.Duration
	loss        float64 // 0-1
}

func newProber() *prober {
	var nonce [8]byte
	rand.Read(nonce[:])
	return &prober{prefix: []byte(probeTag + hex.EncodeToString(nonce[:]) + " "), sent: map[uint64]time.Time{}}
}

// ping returns the next ping to send.
func (p *prober) ping(now time.Time) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expireLocked(now)
	p.seq++
	p.sent[p.seq] = now
	return strconv.AppendUint(append([]byte(nil), p.prefix...), p.seq, 10)
}

// echo reports whether b is the echo of one of this prober's pings, and records its
// round trip if it is the first echo of a ping still counted.
func (p *prober) echo(b []byte, now time.Time) bool {
	seq, ok := parseProbe(b, p.prefix)
	if !ok {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	at, pending := p.sent[seq]
	if !pending {
		return true // a duplicate, or one already counted lost
	}
	delete(p.sent, seq)
	p.resolveLocked(true)
	rtt := now.Sub(at)
	if p.echoes == 0 {
		p.srtt, p.last = rtt, rtt
	} else {
		// Smoothed as TCP does (RFC 6298), jitter as RTP does (RFC 3550 6.4.1) but over
		// round trips, since the peer's clock is not ours.
		p.srtt += (rtt - p.srtt) / 8
		d := rtt - p.last
		p.jitter += (d.Abs() - p.jitter) / 16
		p.last = rtt
	}
	p.echoes++
	return true
}

// health returns the path's health, or false before the first echo.
func (p *prober) health(now time.Time) (pathHealth, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expireLocked(now)
	if p.echoes == 0 {
		return pathHealth{}, false
	}
	lost := 0
	for _, ok := range p.outcomes {
		if !ok {
			lost++
		}
	}
	h := pathHealth{rtt: p.srtt, jitter: p.jitter}
	if len(p.outcomes) > 0 {
		h.loss = float64(lost) / float64(len(p.outcomes))
	}
	return h, true
}

func (p *prober) expireLocked(now time.Time) {
	for seq, at := range p.sent {
		if now.Sub(at) >= probeTimeout {
			delete(p.sent, seq)
			p.resolveLocked(false)
		}
	}
}

func (p *prober) resolveLocked(answered bool) {
	p.outcomes = append(p.outcomes, answered)
	if n := len(p.outcomes); n > probeWindow {
		p.outcomes = append(p.outcomes[:0], p.outcomes[n-probeWindow:]...)
	}
}

// parseProbe returns the sequence number of a ping that starts with prefix.
func parseProbe(b, prefix []byte) (uint64, bool) {
	rest, ok := bytes.CutPrefix(b, prefix)
	if !ok || len(rest) == 0 || len(rest) > 20 {
		return 0, false
	}
	seq, err := strconv.ParseUint(string(rest), 10, 64)
	return seq, err == nil
}
