package session

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics exports the Stats of every session added to it as Prometheus metrics, one
// series per session labelled with the peer's NodeID and the current method. Sessions
// leave it when they end. Register it with a prometheus.Registerer.
type Metrics struct {
	mu       sync.Mutex
	sessions map[*Session]struct{}
}

// NewMetrics returns an empty Metrics.
func NewMetrics() *Metrics { return &Metrics{sessions: map[*Session]struct{}{}} }

// Add starts reporting s until it ends.
func (m *Metrics) Add(s *Session) {
	m.mu.Lock()
	m.sessions[s] = struct{}{}
	m.mu.Unlock()
}

var sessionLabels = []string{"peer", "method"}

var (
	descRTT     = prometheus.NewDesc("peerlink_session_rtt_seconds", "Smoothed round-trip time of the session's current path.", sessionLabels, nil)
	descJitter  = prometheus.NewDesc("peerlink_session_jitter_seconds", "RFC 3550 interarrival jitter of the peer's probes.", sessionLabels, nil)
	descLoss    = prometheus.NewDesc("peerlink_session_loss_ratio", "Share of packets lost lately (0-1).", sessionLabels, nil)
	descQuality = prometheus.NewDesc("peerlink_session_quality", "Path quality score, 0-100.", sessionLabels, nil)
	descBytes   = prometheus.NewDesc("peerlink_session_bytes_total", "Bytes on the session's QUIC connection, by direction.", append(sessionLabels, "direction"), nil)
	descPackets = prometheus.NewDesc("peerlink_session_packets_total", "Packets on the session's QUIC connection, by direction (sent, received, lost).", append(sessionLabels, "direction"), nil)
	descMoves   = prometheus.NewDesc("peerlink_session_path_moves_total", "Moves between the direct path and the relay, by kind (fallback, restore).", append(sessionLabels, "kind"), nil)
	descOpen    = prometheus.NewDesc("peerlink_sessions", "Open sessions, by current method.", []string{"method"}, nil)
)

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRTT, descJitter, descLoss, descQuality, descBytes, descPackets, descMoves, descOpen} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	m.mu.Lock()
	list := make([]*Session, 0, len(m.sessions))
	for s := range m.sessions {
		select {
		case <-s.Done():
			delete(m.sessions, s) // ended: forgotten at the first scrape after
		default:
			list = append(list, s)
		}
	}
	m.mu.Unlock()
	open := map[string]int{}
	for _, s := range list {
		st := s.Stats()
		l := []string{s.Peer().String(), st.Method.String()}
		open[st.Method.String()]++
		g := func(d *prometheus.Desc, v float64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append(append([]string(nil), l...), extra...)...)
		}
		c := func(d *prometheus.Desc, v float64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, append(append([]string(nil), l...), extra...)...)
		}
		g(descRTT, st.RTT.Seconds())
		g(descJitter, st.Jitter.Seconds())
		g(descLoss, st.Loss)
		g(descQuality, float64(st.Quality))
		c(descBytes, float64(st.BytesSent), "sent")
		c(descBytes, float64(st.BytesReceived), "received")
		c(descPackets, float64(st.PacketsSent), "sent")
		c(descPackets, float64(st.PacketsReceived), "received")
		c(descPackets, float64(st.PacketsLost), "lost")
		c(descMoves, float64(st.Fallbacks), "fallback")
		c(descMoves, float64(st.Restores), "restore")
	}
	for method, n := range open {
		ch <- prometheus.MustNewConstMetric(descOpen, prometheus.GaugeValue, float64(n), method)
	}
}
