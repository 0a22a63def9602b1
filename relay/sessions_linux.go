package relay

import "sort"

// Sessions returns the live allocations with their traffic so far, by ID. Each loop
// owns its allocations, so it is asked in turn; a closed server has none.
func (s *Server) Sessions() []SessionInfo {
	var out []SessionInfo
	for _, l := range s.loops {
		var part []SessionInfo
		if l.call(func() {
			for a := range l.owned {
				a.mu.Lock()
				part = append(part, a.infoLocked())
				a.mu.Unlock()
			}
		}) {
			out = append(out, part...)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
