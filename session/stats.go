package session

import (
	"encoding/binary"
	"math"
	"time"

	"peerlink/connect"
)

// Stats describe a session's path as the application feels it.
type Stats struct {
	// Method is how the current path was made.
	Method connect.Method
	// RTT is QUIC's smoothed round-trip time (RFC 9002), MinRTT the lowest seen;
	// ProbeRTT is the last probe's round trip, queueing in both nodes included.
	RTT, MinRTT, ProbeRTT time.Duration
	// Jitter is the RFC 3550 interarrival jitter of the peer's probes: the smoothed
	// variation of their one-way transit time.
	Jitter time.Duration
	// Loss is the share (0-1) of packets lost lately: an average over the last few
	// probe intervals of QUIC's loss counts, or over the whole session when probes are
	// off.
	Loss float64
	// Quality rates the path 0-100 from RTT, Jitter and Loss (see Quality).
	Quality int
	// Bytes and packets on the QUIC connection, retransmissions included, framing
	// below QUIC excluded.
	BytesSent, BytesReceived     uint64
	PacketsSent, PacketsReceived uint64
	PacketsLost                  uint64
	// Fallbacks and Restores count connect's moves from a dead direct path to the relay
	// and back.
	Fallbacks, Restores int
}

// probeState is the probe loop's measurement, guarded by Session.mu.
type probeState struct {
	seq         uint32
	jitter      float64 // nanoseconds
	lastTransit int64
	haveTransit bool
	rtt         time.Duration
	loss        float64
	haveLoss    bool
	sent, lost  uint64 // QUIC counters at the last interval
}

// lossWeight is how much one probe interval's loss moves the average, as RFC 3550's
// 1/16 does for jitter but quicker: loss matters sooner.
const lossWeight = 1.0 / 8

func (s *Session) probeLoop(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	done := s.qc.Context().Done()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		st := s.qc.ConnectionStats()
		s.mu.Lock()
		s.probe.seq++
		seq := s.probe.seq
		ds := st.PacketsSent - s.probe.sent
		var dl uint64
		if st.PacketsLost > s.probe.lost { // QUIC's count may go down: a loss undone
			dl = st.PacketsLost - s.probe.lost
		}
		s.probe.sent, s.probe.lost = st.PacketsSent, st.PacketsLost
		if ds > 0 {
			sample := math.Min(float64(dl)/float64(ds), 1)
			if !s.probe.haveLoss {
				s.probe.loss, s.probe.haveLoss = sample, true
			} else {
				s.probe.loss += (sample - s.probe.loss) * lossWeight
			}
		}
		s.mu.Unlock()
		s.sendProbe(seq)
	}
}

// gotProbe updates the jitter from a peer's probe (RFC 3550, section 6.4.1): the
// difference between two probes' transit times, the peer's clock offset cancelling
// out, smoothed by 1/16.
func (s *Session) gotProbe(b []byte) {
	if len(b) < probeLen {
		return
	}
	transit := int64(time.Since(s.started)) - int64(binary.BigEndian.Uint64(b[4:]))
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.probe.haveTransit {
		d := math.Abs(float64(transit - s.probe.lastTransit))
		s.probe.jitter += (d - s.probe.jitter) / 16
	}
	s.probe.lastTransit, s.probe.haveTransit = transit, true
}

// gotEcho takes the round trip of one of this side's probes.
func (s *Session) gotEcho(b []byte) {
	if len(b) < probeLen {
		return
	}
	rtt := time.Since(s.started) - time.Duration(binary.BigEndian.Uint64(b[4:]))
	if rtt < 0 {
		return
	}
	s.mu.Lock()
	s.probe.rtt = rtt
	s.mu.Unlock()
}

// Stats returns the session's measurements now.
func (s *Session) Stats() Stats {
	qs := s.qc.ConnectionStats()
	cs := s.conn.Stats()
	st := Stats{
		Method: s.conn.Method(), RTT: qs.SmoothedRTT, MinRTT: qs.MinRTT,
		BytesSent: qs.BytesSent, BytesReceived: qs.BytesReceived,
		PacketsSent: qs.PacketsSent, PacketsReceived: qs.PacketsReceived, PacketsLost: qs.PacketsLost,
		Fallbacks: cs.Fallbacks, Restores: cs.Restores,
	}
	s.mu.Lock()
	st.ProbeRTT, st.Jitter = s.probe.rtt, time.Duration(s.probe.jitter)
	st.Loss = s.probe.loss
	haveLoss := s.probe.haveLoss
	s.mu.Unlock()
	if !haveLoss && qs.PacketsSent > 0 {
		st.Loss = math.Min(float64(qs.PacketsLost)/float64(qs.PacketsSent), 1)
	}
	st.Quality = Quality(st.RTT, st.Jitter, st.Loss)
	return st
}

// Quality rates a path 0-100 for interactive use, after the ITU-T G.107 E-model's
// shape as commonly simplified: the one-way delay that jitter buffers add up to costs
// little until about 160 ms and much after, and every percent of loss costs 2.5
// points. 100 is a perfect LAN, about 80 good, under 50 poor.
func Quality(rtt, jitter time.Duration, loss float64) int {
	const rMax = 93.2
	eff := float64(rtt/2+2*jitter)/float64(time.Millisecond) + 10
	r := rMax
	if eff < 160 {
		r -= eff / 40
	} else {
		r -= (eff - 120) / 10
	}
	r -= 2.5 * 100 * math.Max(0, math.Min(loss, 1))
	q := int(math.Round(r / rMax * 100))
	return max(0, min(100, q))
}
