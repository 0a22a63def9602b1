// Package nat is peerlink's model of a NAT: the NATCracker mapping, filtering and
// allocation policies, a detected Profile, and the traversal Plan for a pair of profiles.
package nat

import (
	"fmt"
	"strings"
)

// Mapping is how a NAT reuses an external address:port for one internal address:port.
// The zero value is MappingUnknown.
type Mapping uint8

// Mapping policies.
const (
	MappingUnknown Mapping = iota
	// MappingEI (endpoint-independent): one external address for every destination.
	MappingEI
	// MappingHD (host-dependent): a new external address per destination IP.
	MappingHD
	// MappingPD (port-dependent): a new external address per destination IP and port.
	MappingPD
)

// Filtering is which inbound packets a NAT lets through to a mapping.
// The zero value is FilteringUnknown.
type Filtering uint8

// Filtering policies.
const (
	FilteringUnknown Filtering = iota
	// FilteringEI (endpoint-independent): anyone may send to the mapping.
	FilteringEI
	// FilteringHD (host-dependent): only IPs the inside host has sent to.
	FilteringHD
	// FilteringPD (port-dependent): only IP:port pairs the inside host has sent to.
	FilteringPD
)

// Allocation is how a NAT picks the external port of a new mapping.
// The zero value is AllocationUnknown.
type Allocation uint8

// Allocation policies.
const (
	AllocationUnknown Allocation = iota
	// AllocationPP (port preservation): external port equals the internal port.
	AllocationPP
	// AllocationPC (port contiguity): each new mapping is the last one plus a fixed delta.
	AllocationPC
	// AllocationRD (random): no usable pattern.
	AllocationRD
)

var policyNames = [4]string{"unknown", "ei", "hd", "pd"}
var allocNames = [4]string{"unknown", "pp", "pc", "rd"}

func (m Mapping) String() string    { return nameOf(policyNames[:], uint8(m)) }
func (f Filtering) String() string  { return nameOf(policyNames[:], uint8(f)) }
func (a Allocation) String() string { return nameOf(allocNames[:], uint8(a)) }

func nameOf(names []string, v uint8) string {
	if int(v) < len(names) {
		return names[v]
	}
	return fmt.Sprintf("invalid(%d)", v)
}

func parseName(kind string, names []string, text []byte) (uint8, error) {
	s := strings.TrimSpace(string(text))
	if s == "" {
		return 0, nil
	}
	for i, n := range names {
		if strings.EqualFold(s, n) {
			return uint8(i), nil
		}
	}
	return 0, fmt.Errorf("nat: unknown %s policy %q (want one of %s)", kind, text, strings.Join(names[1:], ", "))
}

// MarshalText returns the lower-case short form: "ei", "hd", "pd" or "unknown".
func (m Mapping) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText accepts the short form in any case; empty means unknown.
func (m *Mapping) UnmarshalText(b []byte) error {
	v, err := parseName("mapping", policyNames[:], b)
	*m = Mapping(v)
	return err
}

// MarshalText returns the lower-case short form: "ei", "hd", "pd" or "unknown".
func (f Filtering) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText accepts the short form in any case; empty means unknown.
func (f *Filtering) UnmarshalText(b []byte) error {
	v, err := parseName("filtering", policyNames[:], b)
	*f = Filtering(v)
	return err
}

// MarshalText returns the lower-case short form: "pp", "pc", "rd" or "unknown".
func (a Allocation) MarshalText() ([]byte, error) { return []byte(a.String()), nil }

// UnmarshalText accepts the short form in any case; empty means unknown.
func (a *Allocation) UnmarshalText(b []byte) error {
	v, err := parseName("allocation", allocNames[:], b)
	*a = Allocation(v)
	return err
}

// Type is one of the 27 NATCracker NAT types.
type Type struct {
	Mapping    Mapping
	Filtering  Filtering
	Allocation Allocation
}

// String returns the form "ei-pd-pp" (mapping-filtering-allocation).
func (t Type) String() string {
	return t.Mapping.String() + "-" + t.Filtering.String() + "-" + t.Allocation.String()
}

// ParseType parses the String form.
func ParseType(s string) (Type, error) {
	parts := strings.Split(s, "-")
	if len(parts) != 3 {
		return Type{}, fmt.Errorf("nat: type %q: want mapping-filtering-allocation, e.g. ei-pd-pp", s)
	}
	var t Type
	if err := t.Mapping.UnmarshalText([]byte(parts[0])); err != nil {
		return Type{}, err
	}
	if err := t.Filtering.UnmarshalText([]byte(parts[1])); err != nil {
		return Type{}, err
	}
	if err := t.Allocation.UnmarshalText([]byte(parts[2])); err != nil {
		return Type{}, err
	}
	return t, nil
}

// Known reports whether all three policies are known.
func (t Type) Known() bool {
	return t.Mapping != MappingUnknown && t.Filtering != FilteringUnknown && t.Allocation != AllocationUnknown
}

// AllTypes returns the 27 NATCracker types in a stable order.
func AllTypes() []Type {
	out := make([]Type, 0, 27)
	for m := MappingEI; m <= MappingPD; m++ {
		for f := FilteringEI; f <= FilteringPD; f++ {
			for a := AllocationPP; a <= AllocationRD; a++ {
				out = append(out, Type{m, f, a})
			}
		}
	}
	return out
}
