package relay

import "github.com/prometheus/client_golang/prometheus"

// collector exports Stats as Prometheus metrics at scrape time, so the data path only
// bumps its own atomic counters and never touches a metric.
type collector struct {
	srv                                       *Server
	enabled, sessions, sessionsTotal, refused *prometheus.Desc
	refusedBy, bytes, packets, drops          *prometheus.Desc
}

func newCollector(s *Server) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("peerlink_relay_"+name, help, labels, nil)
	}
	return &collector{
		srv:           s,
		enabled:       d("enabled", "1 when the relay accepts new allocations."),
		sessions:      d("sessions", "Live allocations (relay sessions)."),
		sessionsTotal: d("allocations_total", "Allocations created."),
		refused:       d("allocations_refused_total", "Allocate requests refused for a limit or while disabled."),
		refusedBy:     d("allocations_refused_by_reason_total", "Allocate requests refused, by reason (the per-source quota is source_quota).", "reason"),
		bytes:         d("relayed_bytes_total", "Payload bytes relayed.", "direction"),
		packets:       d("relayed_packets_total", "Datagrams relayed.", "direction"),
		drops:         d("dropped_packets_total", "Packets dropped, by reason (requests over their source's rate are rate_limited*).", "reason"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.enabled, c.sessions, c.sessionsTotal, c.refused, c.refusedBy, c.bytes, c.packets, c.drops} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	st := c.srv.Stats()
	enabled := 0.0
	if st.Enabled {
		enabled = 1
	}
	ch <- prometheus.MustNewConstMetric(c.enabled, prometheus.GaugeValue, enabled)
	ch <- prometheus.MustNewConstMetric(c.sessions, prometheus.GaugeValue, float64(st.Sessions))
	ch <- prometheus.MustNewConstMetric(c.sessionsTotal, prometheus.CounterValue, float64(st.SessionsTotal))
	ch <- prometheus.MustNewConstMetric(c.refused, prometheus.CounterValue, float64(st.Refused))
	for r := range numRefuseReasons {
		ch <- prometheus.MustNewConstMetric(c.refusedBy, prometheus.CounterValue, float64(st.RefusedBy[r]), r.String())
	}
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(st.BytesToPeers), "to_peer")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(st.BytesToClients), "to_client")
	ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(st.PacketsToPeers), "to_peer")
	ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(st.PacketsToClients), "to_client")
	for r := range numDropReasons {
		ch <- prometheus.MustNewConstMetric(c.drops, prometheus.CounterValue, float64(st.Drops[r]), r.String())
	}
}
