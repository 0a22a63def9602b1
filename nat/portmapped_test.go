package nat

import "testing"

// TestPortMapped: a port-mapped node behind a symmetric NAT is reachable, so a peer
// behind another symmetric NAT dials it directly; without the mapping they relay.
func TestPortMapped(t *testing.T) {
	sym := Profile{Mapping: MappingPD, Filtering: FilteringPD, Allocation: AllocationRD}
	mapped := sym
	mapped.PortMapped = true
	if got := mapped.Type(); got != (Type{MappingEI, FilteringEI, AllocationPP}) {
		t.Errorf("port-mapped Type() = %v, want ei-ei-pp", got)
	}
	for _, tc := range []struct {
		name string
		a, b Profile
		want Step
	}{
		{"to the mapped node", sym, mapped, Step{Direct, SideB}},
		{"from the mapped node", mapped, sym, Step{Reversal, SideA}},
		{"no mapping", sym, sym, Step{Technique: Relay}},
	} {
		if got := Strategy(tc.a, tc.b).Primary(); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
