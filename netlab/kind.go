package netlab

import (
	"fmt"
	"strings"

	"peerlink/nat"
)

// Kind is the NAT (or lack of one) in front of a site's hosts.
type Kind uint8

// NAT kinds. Each states, through Claim, the behaviour the lab promises; SelfTest checks
// that promise against probes.
const (
	KindUnknown Kind = iota
	// KindNone: a host with a public address and no firewall.
	KindNone
	// KindFullCone: endpoint-independent mapping and filtering, ports preserved when free.
	KindFullCone
	// KindRestrictedCone: endpoint-independent mapping, inbound only from IPs the host
	// has sent to (address-dependent filtering).
	KindRestrictedCone
	// KindPortRestricted: endpoint-independent mapping, inbound only from IP:ports the
	// host has sent to.
	KindPortRestricted
	// KindSymmetric: a new random external port for every destination IP:port, inbound
	// only from IP:ports the host has sent to.
	KindSymmetric
	// KindSymmetricSequential: like KindSymmetric but each new mapping takes the next
	// port (contiguity, delta +1).
	KindSymmetricSequential
	// KindCGNAT: a port-restricted home NAT behind a carrier-grade NAT (endpoint-
	// independent mapping, address-dependent filtering, random ports). Together they
	// behave as ei-pd-rd.
	KindCGNAT
	// KindUDPBlocked: a NATing firewall that lets out only TCP to port 443.
	KindUDPBlocked
)

var kindNames = []string{"unknown", "none", "full-cone", "restricted-cone", "port-restricted", "symmetric", "symmetric-seq", "cgnat", "udp-blocked"}

// AllKinds returns every kind, in a stable order.
func AllKinds() []Kind {
	return []Kind{KindNone, KindFullCone, KindRestrictedCone, KindPortRestricted, KindSymmetric, KindSymmetricSequential, KindCGNAT, KindUDPBlocked}
}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", k)
}

// ParseKind parses the String form. Case, hyphens and underscores are ignored.
func ParseKind(s string) (Kind, error) {
	norm := func(s string) string {
		return strings.NewReplacer("-", "", "_", "").Replace(strings.ToLower(strings.TrimSpace(s)))
	}
	for i, n := range kindNames[1:] {
		if norm(s) == norm(n) {
			return Kind(i + 1), nil
		}
	}
	return KindUnknown, fmt.Errorf("netlab: unknown NAT kind %q (want one of %s)", s, strings.Join(kindNames[1:], ", "))
}

// MarshalText returns the String form.
func (k Kind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText parses the String form.
func (k *Kind) UnmarshalText(b []byte) error {
	v, err := ParseKind(string(b))
	*k = v
	return err
}

func typ(m nat.Mapping, f nat.Filtering, a nat.Allocation) nat.Profile {
	return nat.Profile{Mapping: m, Filtering: f, Allocation: a}
}

// Claim returns the behaviour a host behind this kind should measure: the policies, the
// port step for contiguous allocation, and the Open and UDPBlocked flags.
func (k Kind) Claim() nat.Profile {
	switch k {
	case KindNone:
		p := typ(nat.MappingEI, nat.FilteringEI, nat.AllocationPP)
		p.Open = true
		return p
	case KindFullCone:
		return typ(nat.MappingEI, nat.FilteringEI, nat.AllocationPP)
	case KindRestrictedCone:
		return typ(nat.MappingEI, nat.FilteringHD, nat.AllocationPP)
	case KindPortRestricted:
		return typ(nat.MappingEI, nat.FilteringPD, nat.AllocationPP)
	case KindSymmetric:
		return typ(nat.MappingPD, nat.FilteringPD, nat.AllocationRD)
	case KindSymmetricSequential:
		p := typ(nat.MappingPD, nat.FilteringPD, nat.AllocationPC)
		p.PortDelta = 1
		return p
	case KindCGNAT:
		return typ(nat.MappingEI, nat.FilteringPD, nat.AllocationRD)
	case KindUDPBlocked:
		return nat.Profile{UDPBlocked: true}
	}
	return nat.Profile{}
}

// carrierClaim is what a subscriber directly behind the carrier-grade NAT of a KindCGNAT
// site (no home router) should measure.
func carrierClaim() nat.Profile {
	return typ(nat.MappingEI, nat.FilteringHD, nat.AllocationRD)
}

// ClaimString formats a claimed or measured profile for tables: "open ei-ei-pp",
// "pd-pd-pc+1", "udp-blocked".
func ClaimString(p nat.Profile) string {
	switch {
	case p.UDPBlocked:
		return "udp-blocked"
	case p.Open:
		return "open " + p.Type().String()
	}
	s := p.Type().String()
	if p.Allocation == nat.AllocationPC {
		s += fmt.Sprintf("%+d", p.PortDelta)
	}
	return s
}

// SameBehaviour reports whether two profiles describe the same behaviour: flags,
// policies and, for contiguous allocation, the step. Addresses are ignored.
func SameBehaviour(a, b nat.Profile) bool {
	if a.UDPBlocked || b.UDPBlocked {
		return a.UDPBlocked == b.UDPBlocked
	}
	if a.Open != b.Open || a.Type() != b.Type() {
		return false
	}
	return a.Allocation != nat.AllocationPC || a.PortDelta == b.PortDelta
}
