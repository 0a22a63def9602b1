package nat

import (
	"net/netip"
	"testing"
)

func profileOf(t Type) Profile {
	return Profile{Mapping: t.Mapping, Filtering: t.Filtering, Allocation: t.Allocation}
}

// TestStrategyMatrix checks the plan for all 27×27 ordered pairs against the NATCracker
// feasibility counts (reference.md): 378 unordered pairs, 291 traversable by the paper's
// techniques (CR 78, SHP 75, PRP 51, PRC 42, PRP-PRC 21, PRP-PRP 12, PRC-PRC 12), 41 more by
// birthday probing, 46 relay-only.
func TestStrategyMatrix(t *testing.T) {
	types := AllTypes()
	if len(types) != 27 {
		t.Fatalf("AllTypes: %d types, want 27", len(types))
	}
	counts := map[string]int{}
	unordered, natcracker, birthday, relayOnly := 0, 0, 0, 0
	for i, a := range types {
		for j, b := range types {
			ab := Strategy(profileOf(a), profileOf(b))
			ba := Strategy(profileOf(b), profileOf(a))
			if last := ab[len(ab)-1]; last.Technique != Relay {
				t.Errorf("%s→%s: plan %v does not end with relay", a, b, ab)
			}
			pa, pb := ab.Primary(), ba.Primary()
			// Swapping initiator and responder changes who dials but not what is
			// possible: the same technique, on the same peer unless both qualify.
			if kind(pa.Technique) != kind(pb.Technique) {
				t.Errorf("%s↔%s: plans disagree: %v vs %v", a, b, ab, ba)
			}
			if j < i {
				continue
			}
			unordered++
			tech := pa.Technique
			switch {
			case tech.NATCracker():
				natcracker++
				if tech == Reversal {
					tech = Direct
				}
				counts[tech.String()]++
			case tech == Birthday:
				birthday++
				hardSide, easy := a, b
				if pa.Side == SideB {
					hardSide, easy = b, a
				}
				// The easy side's mapping must be the same for every destination, and
				// the hard side must be what made the NATCracker techniques fail.
				if easy.Mapping != MappingEI || (hardSide.Mapping == MappingEI && hardSide.Allocation != AllocationRD) {
					t.Errorf("%s↔%s: birthday probing with hard side %s and easy side %s", a, b, hardSide, easy)
				}
			case tech == Relay:
				relayOnly++
				// Relay-only: neither mapping is the same for all destinations, and at
				// least one side's ports cannot be predicted.
				if a.Mapping == MappingEI || b.Mapping == MappingEI || (a.Allocation != AllocationRD && b.Allocation != AllocationRD) {
					t.Errorf("%s↔%s: relay-only, but one side is predictable", a, b)
				}
			default:
				t.Errorf("%s↔%s: unexpected primary %v", a, b, pa)
			}
		}
	}
	check := func(name string, got, want int) {
		t.Helper()
		if got != want {
			t.Errorf("%s: got %d pairs, want %d", name, got, want)
		}
	}
	check("unordered pairs", unordered, 378)
	check("NATCracker-traversable", natcracker, 291)
	check("birthday probing", birthday, 41)
	check("relay only", relayOnly, 46)
	for name, want := range map[string]int{"direct": 78, "shp": 75, "prp": 51, "prc": 42, "prp-prc": 21, "prp-prp": 12, "prc-prc": 12} {
		check("technique "+name, counts[name], want)
	}
}

// kind folds Reversal into Direct: which one applies depends only on who initiates.
func kind(t Technique) Technique {
	if t == Reversal {
		return Direct
	}
	return t
}

func mustType(t *testing.T, s string) Type {
	t.Helper()
	ty, err := ParseType(s)
	if err != nil {
		t.Fatal(err)
	}
	return ty
}

func TestStrategyCases(t *testing.T) {
	pub := netip.MustParseAddr("198.51.100.7")
	tests := []struct {
		name string
		a, b Profile
		want string
	}{
		{"open responder", profileOf(mustType(t, "pd-pd-rd")), Profile{Open: true}, "direct(b) → relay"},
		{"open initiator", Profile{Open: true}, profileOf(mustType(t, "pd-pd-rd")), "reversal(a) → relay"},
		{"firewalled open host is not reachable", Profile{Open: true, Filtering: FilteringPD}, profileOf(mustType(t, "ei-pd-pp")), "prp-prp → relay"},
		{"restricted cone vs port-preserving symmetric", profileOf(mustType(t, "ei-hd-rd")), profileOf(mustType(t, "pd-hd-pp")), "prp(b) → relay"},
		{"port-restricted cone pair, one random", profileOf(mustType(t, "ei-pd-pp")), profileOf(mustType(t, "ei-pd-rd")), "birthday(b) → relay"},
		{"symmetric vs port-restricted cone", profileOf(mustType(t, "pd-pd-rd")), profileOf(mustType(t, "ei-pd-pp")), "birthday(a) → relay"},
		{"contiguous symmetric pair", profileOf(mustType(t, "pd-pd-pc")), profileOf(mustType(t, "hd-pd-rd")), "relay"},
		{"symmetric vs random port-restricted", profileOf(mustType(t, "pd-pd-rd")), profileOf(mustType(t, "ei-pd-rd")), "birthday(a) → relay"},
		{"both symmetric", profileOf(mustType(t, "pd-pd-rd")), profileOf(mustType(t, "hd-pd-rd")), "relay"},
		{"udp blocked", Profile{UDPBlocked: true}, Profile{Open: true}, "relay"},
		{"unknown initiator, open responder", Profile{}, Profile{Open: true}, "direct(b) → relay"},
		{"both unknown", Profile{}, Profile{}, "shp → relay"},
		{"same public ip", Profile{Mapping: MappingPD, Filtering: FilteringPD, Allocation: AllocationRD, PublicIP: pub},
			Profile{Mapping: MappingPD, Filtering: FilteringPD, Allocation: AllocationRD, PublicIP: pub}, "local → relay"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Strategy(tt.a, tt.b).String(); got != tt.want {
				t.Errorf("Strategy = %q, want %q", got, tt.want)
			}
		})
	}
}

func FuzzParseType(f *testing.F) {
	for _, s := range []string{"ei-ei-pp", "PD-pd-RD", "", "a-b-c", "ei--pp", "hd-hd-pc-x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ty, err := ParseType(s)
		if err != nil {
			return
		}
		if ty.Known() {
			back, err := ParseType(ty.String())
			if err != nil || back != ty {
				t.Fatalf("round trip %q → %v → %v, %v", s, ty, back, err)
			}
		}
	})
}
