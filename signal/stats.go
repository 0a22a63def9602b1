package signal

import (
	"sort"
	"time"

	"peerlink/identity"
)

// PeerInfo describes one authenticated rendezvous connection, for dashboards.
type PeerInfo struct {
	Node identity.NodeID
	// Remote is the client's address as the server sees it.
	Remote string
	// LastHeard is when the client last sent a frame or answered a ping.
	LastHeard time.Time
}

// Peers returns the nodes connected and authenticated now, by NodeID.
func (s *Server) Peers() []PeerInfo {
	s.mu.Lock()
	out := make([]PeerInfo, 0, len(s.conns))
	for id, c := range s.conns {
		out = append(out, PeerInfo{Node: id, Remote: c.remote, LastHeard: time.Unix(0, c.heard.Load())})
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Node.String() < out[j].Node.String() })
	return out
}
