package punch

import (
	"fmt"
	"net/netip"

	"peerlink/nat"
)

// role is one side's part in a plan step. Both sides derive their roles from the same
// step, so what one expects of the other is what the other does.
type role struct {
	// fresh: open a fresh socket, predict its next mapping and check from it. A fresh
	// socket has no mappings yet, so under port preservation its first one keeps its
	// local port even behind a NAT that maps per destination.
	fresh bool
	// hard: the hard side of birthday probing: open many sockets that each check the
	// easy side's reflexive address, opening its NAT's filter for it.
	hard bool
	// probe: the easy side of birthday probing: probe random ports of the hard side's
	// public IP from the main socket.
	probe bool
	// simple: check between the main sockets' reflexive addresses, as simple hole
	// punching does (see bothEI).
	simple bool
}

func roleOf(step nat.Step, self nat.Side, local, remote nat.Profile) (role, error) {
	if self != nat.SideA && self != nat.SideB {
		return role{}, fmt.Errorf("%w: Self is %v, want a or b", ErrBadParams, self)
	}
	t := step.Technique
	switch t {
	case nat.Local, nat.Direct, nat.Reversal, nat.SimplePunch,
		nat.PredictPreservationBoth, nat.PredictContiguityBoth, nat.PredictMixed:
	case nat.PredictPreservation, nat.PredictContiguity, nat.Birthday:
		if step.Side != nat.SideA && step.Side != nat.SideB {
			return role{}, fmt.Errorf("%w: step %v names no side", ErrBadParams, step)
		}
	default:
		return role{}, fmt.Errorf("%w: %v", ErrNotPunchable, step)
	}
	switch {
	case t == nat.Local || t == nat.Direct || t == nat.Reversal || t == nat.SimplePunch:
		return role{}, nil
	case bothEI(local, remote):
		// Endpoint-independent mapping on both sides: each main socket's reflexive
		// address is its mapping toward everyone, so simple hole punching between
		// them works whatever the filtering; predicting or probing adds nothing.
		return role{simple: true}, nil
	case t == nat.PredictPreservation || t == nat.PredictContiguity:
		return role{fresh: step.Side == self}, nil
	case t == nat.Birthday:
		return role{hard: step.Side == self, probe: step.Side != self}, nil
	}
	return role{fresh: true}, nil // interleaved prediction
}

// needsMapping reports whether a fresh socket behind p must learn its mapping with a
// STUN Binding before its next mapping can be predicted: under endpoint-independent
// mapping that mapping is the one the peer will see; under contiguous allocation the
// next one follows it. Under port preservation with a destination-dependent mapping the
// query would spend the preserved port on the STUN server, so there is none.
func needsMapping(p nat.Profile) bool {
	t := p.Type()
	return t.Mapping == nat.MappingEI || t.Allocation == nat.AllocationPC
}

// predictPorts returns the likely external ports of a fresh socket's mapping toward the
// peer, most likely first: its mapping itself when the NAT maps independently of the
// destination; the next window mappings after it (mapped+delta·k) when it allocates
// contiguously; otherwise, under preservation, the local port.
func predictPorts(p nat.Profile, local uint16, mapped netip.AddrPort, window int) []uint16 {
	t := p.Type()
	switch {
	case t.Mapping == nat.MappingEI && mapped.IsValid():
		return []uint16{mapped.Port()}
	case t.Allocation == nat.AllocationPC && mapped.IsValid():
		d := p.PortDelta
		if d == 0 {
			d = 1
		}
		ports := make([]uint16, 0, window)
		for k := 1; k <= window; k++ {
			ports = append(ports, stepPort(mapped.Port(), d*k))
		}
		return ports
	}
	return []uint16{local}
}

// The range NATs allocate external ports from.
const (
	minPort  = 1024
	maxPort  = 65535
	portSpan = maxPort - minPort + 1
)

// stepPort moves port by d within [minPort, maxPort], wrapping around.
func stepPort(port uint16, d int) uint16 {
	p := int(port)
	if p < minPort {
		p = minPort
	}
	return uint16(minPort + ((p-minPort+d)%portSpan+portSpan)%portSpan)
}

// bothEI reports whether both peers map endpoint-independently. Their main sockets'
// reflexive addresses are then the mappings each will see of the other, so simple hole
// punching works whatever the plan's technique.
func bothEI(a, b nat.Profile) bool {
	return a.Type().Mapping == nat.MappingEI && b.Type().Mapping == nat.MappingEI
}

// publicTargets returns where to reach the peer's NAT from outside: its reflexive
// candidates, or its profile's public address.
func publicTargets(p Params, remote nat.Profile) []netip.AddrPort {
	if len(p.RemoteReflexive) > 0 {
		return p.RemoteReflexive
	}
	if pub := remote.Public(); pub.IsValid() && pub.Port() != 0 {
		return []netip.AddrPort{pub}
	}
	return nil
}
