package nat

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestPolicyText(t *testing.T) {
	tests := []struct {
		v    interface{ MarshalText() ([]byte, error) }
		want string
	}{
		{MappingEI, "ei"}, {MappingHD, "hd"}, {MappingPD, "pd"}, {MappingUnknown, "unknown"},
		{FilteringEI, "ei"}, {FilteringHD, "hd"}, {FilteringPD, "pd"},
		{AllocationPP, "pp"}, {AllocationPC, "pc"}, {AllocationRD, "rd"},
		{ConfidenceHigh, "high"}, {ConfidenceMedium, "medium"}, {ConfidenceLow, "low"},
	}
	for _, tt := range tests {
		b, _ := tt.v.MarshalText()
		if string(b) != tt.want {
			t.Errorf("%T(%v).MarshalText = %q, want %q", tt.v, tt.v, b, tt.want)
		}
	}
	var m Mapping
	if err := m.UnmarshalText([]byte("PD")); err != nil || m != MappingPD {
		t.Errorf("UnmarshalText(PD) = %v, %v", m, err)
	}
	if err := m.UnmarshalText([]byte("cone")); err == nil || !strings.Contains(err.Error(), "ei, hd, pd") {
		t.Errorf("UnmarshalText(cone) error = %v, want one naming the choices", err)
	}
}

func TestProfileJSON(t *testing.T) {
	p := Profile{
		Mapping: MappingEI, Filtering: FilteringPD, Allocation: AllocationPC, PortDelta: 2,
		PublicIP: netip.MustParseAddr("203.0.113.5"), PublicPort: 4433, Hairpinning: true,
		BindingLifetime: Duration(30 * time.Second),
		DetectedAt:      time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC), Confidence: ConfidenceHigh,
	}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(b, &fields); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]any{
		"mapping": "ei", "filtering": "pd", "allocation": "pc", "port_delta": 2.0,
		"public_ip": "203.0.113.5", "public_port": 4433.0, "hairpinning": true,
		"binding_lifetime": "30s", "detected_at": "2026-11-22T03:00:00Z", "confidence": "high",
	} {
		if fields[k] != want {
			t.Errorf("JSON field %s = %v, want %v (in %s)", k, fields[k], want, b)
		}
	}
	var back Profile
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back != p {
		t.Errorf("round trip:\n got %+v\nwant %+v", back, p)
	}
	if err := json.Unmarshal([]byte(`{"mapping":"sideways"}`), &back); err == nil {
		t.Error("bad mapping accepted")
	}
}

func TestClassic(t *testing.T) {
	tests := []struct {
		p    Profile
		want Classic
	}{
		{Profile{Open: true}, ClassicOpen},
		{Profile{Open: true, Filtering: FilteringPD}, ClassicFirewalled},
		{Profile{UDPBlocked: true}, ClassicUDPBlocked},
		{Profile{Mapping: MappingEI, Filtering: FilteringEI, Allocation: AllocationPP}, ClassicFullCone},
		{Profile{Mapping: MappingEI, Filtering: FilteringHD, Allocation: AllocationRD}, ClassicRestrictedCone},
		{Profile{Mapping: MappingEI, Filtering: FilteringPD, Allocation: AllocationPP}, ClassicPortRestrictedCone},
		{Profile{Mapping: MappingPD, Filtering: FilteringPD, Allocation: AllocationRD}, ClassicSymmetric},
		{Profile{Mapping: MappingHD, Filtering: FilteringEI, Allocation: AllocationPC}, ClassicSymmetric},
		{Profile{}, ClassicUnknown},
	}
	for _, tt := range tests {
		if got := tt.p.Classic(); got != tt.want {
			t.Errorf("%+v.Classic() = %v, want %v", tt.p, got, tt.want)
		}
	}
	for _, c := range []Classic{ClassicOpen, ClassicFullCone, ClassicRestrictedCone, ClassicPortRestrictedCone, ClassicSymmetric, ClassicUDPBlocked} {
		var back Classic
		text, _ := c.MarshalText()
		if err := back.UnmarshalText(text); err != nil || back != c {
			t.Errorf("Classic %q round trip: %v, %v", text, back, err)
		}
	}
	if s := (Profile{Mapping: MappingEI, Filtering: FilteringPD, Allocation: AllocationPC, PortDelta: 1}).String(); !strings.Contains(s, "port-restricted cone NAT") || !strings.Contains(s, "delta +1") {
		t.Errorf("String() = %q", s)
	}
}

func TestParseTypeAll(t *testing.T) {
	seen := map[Type]bool{}
	for _, ty := range AllTypes() {
		back, err := ParseType(ty.String())
		if err != nil || back != ty {
			t.Errorf("ParseType(%q) = %v, %v", ty, back, err)
		}
		seen[ty] = true
	}
	if len(seen) != 27 {
		t.Errorf("AllTypes has %d distinct types, want 27", len(seen))
	}
}
