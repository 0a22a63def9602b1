package nat

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Confidence says how far a Profile can be trusted. The zero value is ConfidenceLow.
type Confidence uint8

// Confidence levels.
const (
	// ConfidenceLow: one observer, or observers that disagree.
	ConfidenceLow Confidence = iota
	// ConfidenceMedium: the policies agree but some were inferred rather than tested.
	ConfidenceMedium
	// ConfidenceHigh: every policy tested directly and confirmed by independent observers.
	ConfidenceHigh
)

var confidenceNames = []string{"low", "medium", "high"}

func (c Confidence) String() string { return nameOf(confidenceNames, uint8(c)) }

// MarshalText returns "low", "medium" or "high".
func (c Confidence) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// UnmarshalText parses "low", "medium" or "high"; empty means low.
func (c *Confidence) UnmarshalText(b []byte) error {
	s := strings.ToLower(strings.TrimSpace(string(b)))
	for i, n := range confidenceNames {
		if s == n {
			*c = Confidence(i)
			return nil
		}
	}
	if s == "" {
		*c = ConfidenceLow
		return nil
	}
	return fmt.Errorf("nat: unknown confidence %q (want low, medium or high)", b)
}

// Profile is what peerlink knows about the NAT in front of one node.
//
// The zero value is a profile about which nothing is known: every policy unknown, not
// open, UDP not known to be blocked.
type Profile struct {
	Mapping    Mapping    `json:"mapping"`
	Filtering  Filtering  `json:"filtering"`
	Allocation Allocation `json:"allocation"`
	// PortDelta is the step between consecutive external ports when Allocation is PC.
	PortDelta int `json:"port_delta,omitempty"`

	// Open is true when there is no NAT: the reflexive address equals a local one.
	// An open host has endpoint-independent mapping, preserved ports and, unless a
	// firewall filters, endpoint-independent filtering.
	Open bool `json:"open,omitempty"`
	// UDPBlocked is true when no UDP reached any observer: only relays over TCP or TLS
	// can reach this node.
	UDPBlocked bool `json:"udp_blocked,omitempty"`
	// PortMapped is true when PublicIP:PublicPort is a port mapping the gateway made on
	// request (UPnP IGD, NAT-PMP, PCP): anyone can reach the node there whatever the
	// NAT does with other traffic, so Type says ei-ei-pp as for an open host, while
	// Mapping, Filtering and Allocation still describe the NAT.
	PortMapped bool `json:"port_mapped,omitempty"`

	// PublicIP and PublicPort are the reflexive address of the probing socket.
	PublicIP   netip.Addr `json:"public_ip,omitzero"`
	PublicPort uint16     `json:"public_port,omitempty"`
	// Hairpinning is true when the NAT forwards packets sent to its own public address
	// back inside.
	Hairpinning bool `json:"hairpinning"`
	// BindingLifetime is how long an idle mapping lasts; zero when not measured.
	BindingLifetime Duration `json:"binding_lifetime,omitempty"`

	DetectedAt time.Time  `json:"detected_at,omitzero"`
	Confidence Confidence `json:"confidence"`
}

// Type returns the profile's NATCracker type. An open host is ei-ei-pp, and so is a
// port-mapped one.
func (p Profile) Type() Type {
	if p.PortMapped {
		return Type{MappingEI, FilteringEI, AllocationPP}
	}
	if p.Open {
		f := p.Filtering
		if f == FilteringUnknown {
			f = FilteringEI
		}
		return Type{MappingEI, f, AllocationPP}
	}
	return Type{p.Mapping, p.Filtering, p.Allocation}
}

// Public returns the reflexive address as an AddrPort.
func (p Profile) Public() netip.AddrPort { return netip.AddrPortFrom(p.PublicIP, p.PublicPort) }

// Classic returns the pre-NATCracker name for the profile.
func (p Profile) Classic() Classic {
	switch {
	case p.UDPBlocked:
		return ClassicUDPBlocked
	case p.Open && (p.Filtering == FilteringUnknown || p.Filtering == FilteringEI):
		return ClassicOpen
	case p.Open:
		return ClassicFirewalled
	}
	switch p.Mapping {
	case MappingEI:
		switch p.Filtering {
		case FilteringEI:
			return ClassicFullCone
		case FilteringHD:
			return ClassicRestrictedCone
		case FilteringPD:
			return ClassicPortRestrictedCone
		}
	case MappingHD, MappingPD:
		return ClassicSymmetric
	}
	return ClassicUnknown
}

// String summarises the profile in one line.
func (p Profile) String() string {
	s := fmt.Sprintf("%s (mapping %s, filtering %s, allocation %s", p.Classic().Describe(), p.Mapping, p.Filtering, p.Allocation)
	if p.Allocation == AllocationPC {
		s += fmt.Sprintf(" delta %+d", p.PortDelta)
	}
	s += ")"
	if p.PublicIP.IsValid() {
		s += " public " + p.Public().String()
	}
	if p.PortMapped {
		s += " (port-mapped)"
	}
	return s
}

// Classic is a NAT type in the classic RFC 3489 vocabulary.
type Classic uint8

// Classic names.
const (
	ClassicUnknown Classic = iota
	ClassicOpen
	ClassicFirewalled // no NAT, but a firewall filters inbound
	ClassicFullCone
	ClassicRestrictedCone
	ClassicPortRestrictedCone
	ClassicSymmetric
	ClassicUDPBlocked
)

var classicText = []string{"unknown", "open", "firewalled", "fullCone", "restrictedCone", "portRestricted", "symmetric", "udpBlocked"}
var classicWords = []string{"unknown NAT", "no NAT (open internet)", "no NAT, firewalled", "full cone NAT", "restricted cone NAT", "port-restricted cone NAT", "symmetric NAT", "UDP blocked"}

// String returns the camel-case wire form used in signaling ("fullCone", ...).
func (c Classic) String() string { return nameOf(classicText, uint8(c)) }

// Describe returns the name in words for people.
func (c Classic) Describe() string { return nameOf(classicWords, uint8(c)) }

// MarshalText returns the wire form.
func (c Classic) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// UnmarshalText parses the wire form; empty means unknown.
func (c *Classic) UnmarshalText(b []byte) error {
	v, err := parseName("classic", classicText, b)
	*c = Classic(v)
	return err
}

// Duration is a time.Duration that encodes in JSON as a Go duration string ("25s").
type Duration time.Duration

// MarshalJSON encodes d as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON accepts a duration string or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err2 := json.Unmarshal(b, &n); err2 != nil {
			return fmt.Errorf("nat: duration %s: want a string like \"25s\"", b)
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("nat: duration: %w", err)
	}
	*d = Duration(v)
	return nil
}
