package nat

import (
	"fmt"
	"strings"
)

// Technique is one way of getting two peers a path.
type Technique uint8

// Techniques, in the NATCracker vocabulary where one exists.
const (
	TechniqueNone Technique = iota
	// Local: both peers share a public IP, so try their host candidates first; no
	// hairpinning needed when they are on one LAN.
	Local
	// Direct: the responder is reachable (public, or full cone); the initiator dials it.
	Direct
	// Reversal: the initiator is reachable; the responder is asked to dial back
	// (NATCracker connection reversal).
	Reversal
	// SimplePunch: both send to each other's reflexive address at an agreed time (SHP).
	SimplePunch
	// PredictPreservation: the peer on Step.Side preserves ports, so its mapping toward
	// the other is predicted as its local port (PRP).
	PredictPreservation
	// PredictContiguity: the peer on Step.Side allocates ports contiguously, so its next
	// mapping is predicted from the measured delta (PRC).
	PredictContiguity
	// PredictPreservationBoth: both preserve ports; predictions interleave (PRP-PRP).
	PredictPreservationBoth
	// PredictContiguityBoth: both allocate contiguously (PRC-PRC).
	PredictContiguityBoth
	// PredictMixed: one preserves and one is contiguous (PRP-PRC).
	PredictMixed
	// Birthday: the hard peer on Step.Side opens many sockets toward the easy peer,
	// which probes random ports of the hard peer's IP until one pair meets.
	Birthday
	// Relay: traffic goes through a relay (TURN, then the HTTPS relay).
	Relay
)

var techniqueNames = []string{"none", "local", "direct", "reversal", "shp", "prp", "prc", "prp-prp", "prc-prc", "prp-prc", "birthday", "relay"}

func (t Technique) String() string { return nameOf(techniqueNames, uint8(t)) }

// MarshalText returns the short name ("shp", "prp-prc", "birthday", ...).
func (t Technique) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// UnmarshalText parses the short name.
func (t *Technique) UnmarshalText(b []byte) error {
	v, err := parseName("technique", techniqueNames, b)
	*t = Technique(v)
	return err
}

// NATCracker reports whether t is one of the paper's techniques (CR, SHP, PRP, PRC and
// their interleaved forms), as opposed to birthday probing, relaying or a LAN shortcut.
func (t Technique) NATCracker() bool { return t >= Direct && t <= PredictMixed }

// Side names a peer of a pair: A is the initiator, B the responder.
type Side uint8

// Sides.
const (
	SideBoth Side = iota
	SideA
	SideB
)

func (s Side) String() string { return nameOf([]string{"both", "a", "b"}, uint8(s)) }

// Step is one technique of a Plan.
type Step struct {
	Technique Technique
	// Side is the peer the technique centres on: the reachable peer for Direct and
	// Reversal, the predicted peer for PredictPreservation and PredictContiguity, the
	// hard peer for Birthday; SideBoth otherwise.
	Side Side
}

func (s Step) String() string {
	if s.Side == SideBoth {
		return s.Technique.String()
	}
	return s.Technique.String() + "(" + s.Side.String() + ")"
}

// Plan is the ordered list of techniques to try for a pair of peers. It always ends
// with Relay, the fallback that works whatever the NATs; whether relaying is allowed is
// the connector's decision, not the plan's.
type Plan []Step

// Primary returns the technique expected to give a direct path, or Relay when none can.
func (p Plan) Primary() Step {
	for _, s := range p {
		if s.Technique != Local {
			return s
		}
	}
	return Step{Technique: Relay}
}

// DirectCapable reports whether the plan expects a path that avoids relays.
func (p Plan) DirectCapable() bool { return p.Primary().Technique != Relay }

func (p Plan) String() string {
	parts := make([]string, len(p))
	for i, s := range p {
		parts[i] = s.String()
	}
	return strings.Join(parts, " → ")
}

// Strategy returns the plan for initiator a connecting to responder b.
//
// Known profiles follow the NATCracker feasibility rules: connection reversal when a
// peer is reachable, then simple hole punching, then port prediction (one side, then
// interleaved), then birthday probing for one hard peer facing an endpoint-independent
// one. Pairs with two unpredictable peers are relayed. When a policy is unknown the plan
// still tries simple hole punching, which costs little, before the relay.
func Strategy(a, b Profile) Plan {
	var plan Plan
	if a.UDPBlocked || b.UDPBlocked {
		return Plan{{Technique: Relay}}
	}
	if a.PublicIP.IsValid() && a.PublicIP == b.PublicIP && !a.Open {
		plan = append(plan, Step{Technique: Local})
	}
	ta, tb := a.Type(), b.Type()
	if !ta.Known() || !tb.Known() {
		switch {
		case reachable(tb):
			plan = append(plan, Step{Direct, SideB})
		case reachable(ta):
			plan = append(plan, Step{Reversal, SideA})
		default:
			plan = append(plan, Step{Technique: SimplePunch})
		}
		return append(plan, Step{Technique: Relay})
	}
	if s, ok := pairStep(ta, tb); ok {
		plan = append(plan, s)
	}
	return append(plan, Step{Technique: Relay})
}

// reachable: anyone can send to the peer's reflexive address once it has sent anything.
// An open host reports ei-ei-pp from Profile.Type.
func reachable(t Type) bool { return t.Mapping == MappingEI && t.Filtering == FilteringEI }

// pairStep applies the traversal rules to two known types.
func pairStep(a, b Type) (Step, bool) {
	switch {
	case reachable(b):
		return Step{Direct, SideB}, true
	case reachable(a):
		return Step{Reversal, SideA}, true
	case shp(a, b):
		return Step{Technique: SimplePunch}, true
	}
	for _, alloc := range []Allocation{AllocationPP, AllocationPC} {
		t := PredictPreservation
		if alloc == AllocationPC {
			t = PredictContiguity
		}
		if predictable(a, b, alloc) {
			return Step{t, SideA}, true
		}
		if predictable(b, a, alloc) {
			return Step{t, SideB}, true
		}
	}
	switch {
	case a.Allocation == AllocationPP && b.Allocation == AllocationPP:
		return Step{Technique: PredictPreservationBoth}, true
	case a.Allocation == AllocationPC && b.Allocation == AllocationPC:
		return Step{Technique: PredictContiguityBoth}, true
	case a.Allocation != AllocationRD && b.Allocation != AllocationRD:
		return Step{Technique: PredictMixed}, true
	}
	// Birthday probing: a peer with endpoint-independent mapping has one known mapping
	// for everyone, so the other peer's unpredictable ports can be found by probing: the
	// hard side's many sockets each open its filter toward that one mapping, and the easy
	// side's random probes need hit only one of them. The hard side is the one whose
	// mapping depends on the destination; when both map independently of it (and so
	// their reflexive ports are known), the one that allocates randomly.
	switch {
	case a.Mapping == MappingEI && b.Mapping == MappingEI:
		if b.Allocation == AllocationRD && a.Allocation != AllocationRD {
			return Step{Birthday, SideB}, true
		}
		return Step{Birthday, SideA}, true
	case b.Mapping == MappingEI:
		return Step{Birthday, SideA}, true
	case a.Mapping == MappingEI:
		return Step{Birthday, SideB}, true
	}
	return Step{}, false
}

// shp: simple hole punching works when a packet to the plain reflexive address gets
// through: both filters open to everyone, or one is, and the other admits a reply from
// a new port of a host it has contacted.
func shp(a, b Type) bool {
	if a.Filtering == FilteringEI && b.Filtering == FilteringEI {
		return true
	}
	return (a.Filtering == FilteringEI && b.Filtering != FilteringPD) ||
		(b.Filtering == FilteringEI && a.Filtering != FilteringPD)
}

// predictable: the other side can aim at x's next mapping because x's allocation is
// alloc, and x's filter (or the other's) admits the first packets.
func predictable(x, other Type, alloc Allocation) bool {
	return x.Allocation == alloc && x.Filtering != FilteringPD &&
		(x.Mapping != MappingPD || other.Filtering != FilteringPD)
}

// Describe explains the plan's primary technique in a sentence for people.
func (p Plan) Describe() string {
	s := p.Primary()
	switch s.Technique {
	case Direct:
		return "the responder is reachable: dial it directly"
	case Reversal:
		return "the initiator is reachable: ask the responder to dial back (connection reversal)"
	case SimplePunch:
		return "simple hole punching: both send to each other's public address at once"
	case PredictPreservation, PredictContiguity:
		return fmt.Sprintf("hole punching with port prediction (%s) of peer %s", s.Technique, s.Side)
	case PredictPreservationBoth, PredictContiguityBoth, PredictMixed:
		return fmt.Sprintf("hole punching with interleaved port prediction (%s)", s.Technique)
	case Birthday:
		return fmt.Sprintf("birthday probing: peer %s opens many sockets, the other probes random ports", s.Side)
	}
	return "no direct path is possible between these NATs: relay"
}
