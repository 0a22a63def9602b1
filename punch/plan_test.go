package punch

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"peerlink/nat"
)

func profile(t *testing.T, s string, delta int) nat.Profile {
	t.Helper()
	ty, err := nat.ParseType(s)
	if err != nil {
		t.Fatal(err)
	}
	return nat.Profile{Mapping: ty.Mapping, Filtering: ty.Filtering, Allocation: ty.Allocation, PortDelta: delta}
}

func TestRoleOf(t *testing.T) {
	hard, easy := profile(t, "pd-pd-rd", 0), profile(t, "ei-pd-pp", 0)
	pp, pc := profile(t, "pd-hd-pp", 0), profile(t, "pd-pd-pc", 1)
	eiRD := profile(t, "ei-pd-rd", 0)
	tests := []struct {
		name          string
		step          nat.Step
		self          nat.Side
		local, remote nat.Profile
		want          role
		err           error
	}{
		{"shp", nat.Step{Technique: nat.SimplePunch}, nat.SideA, hard, easy, role{}, nil},
		{"direct", nat.Step{Technique: nat.Direct, Side: nat.SideB}, nat.SideA, hard, easy, role{}, nil},
		{"predicted side", nat.Step{Technique: nat.PredictPreservation, Side: nat.SideA}, nat.SideA, pp, hard, role{fresh: true}, nil},
		{"other side", nat.Step{Technique: nat.PredictPreservation, Side: nat.SideA}, nat.SideB, hard, pp, role{}, nil},
		{"interleaved", nat.Step{Technique: nat.PredictMixed}, nat.SideB, pc, pp, role{fresh: true}, nil},
		{"birthday hard", nat.Step{Technique: nat.Birthday, Side: nat.SideB}, nat.SideB, hard, easy, role{hard: true}, nil},
		{"birthday easy", nat.Step{Technique: nat.Birthday, Side: nat.SideB}, nat.SideA, easy, hard, role{probe: true}, nil},
		{"birthday between EI mappings", nat.Step{Technique: nat.Birthday, Side: nat.SideB}, nat.SideB, eiRD, easy, role{simple: true}, nil},
		{"relay", nat.Step{Technique: nat.Relay}, nat.SideA, hard, hard, role{}, ErrNotPunchable},
		{"none", nat.Step{}, nat.SideA, hard, hard, role{}, ErrNotPunchable},
		{"no side", nat.Step{Technique: nat.Birthday}, nat.SideA, easy, hard, role{}, ErrBadParams},
		{"bad self", nat.Step{Technique: nat.SimplePunch}, nat.SideBoth, easy, hard, role{}, ErrBadParams},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := roleOf(tt.step, tt.self, tt.local, tt.remote)
			if !errors.Is(err, tt.err) || (err == nil && got != tt.want) {
				t.Errorf("roleOf = %+v, %v; want %+v, %v", got, err, tt.want, tt.err)
			}
		})
	}
}

func TestPredictPorts(t *testing.T) {
	mapped := netip.MustParseAddrPort("198.51.100.1:5000")
	tests := []struct {
		name   string
		p      nat.Profile
		local  uint16
		mapped netip.AddrPort
		want   []uint16
	}{
		{"ei mapping: the mapping itself", profile(t, "ei-hd-rd", 0), 40000, mapped, []uint16{5000}},
		{"preservation: the local port", profile(t, "pd-hd-pp", 0), 40000, netip.AddrPort{}, []uint16{40000}},
		{"contiguity", profile(t, "hd-hd-pc", 3), 40000, mapped, []uint16{5003, 5006, 5009, 5012}},
		{"contiguity, no delta measured", profile(t, "pd-hd-pc", 0), 40000, mapped, []uint16{5001, 5002, 5003, 5004}},
		{"contiguity down and around", profile(t, "pd-hd-pc", -2), 40000, netip.MustParseAddrPort("198.51.100.1:1027"), []uint16{1025, 65535, 65533, 65531}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := predictPorts(tt.p, tt.local, tt.mapped, 4); !slices.Equal(got, tt.want) {
				t.Errorf("predictPorts = %v, want %v", got, tt.want)
			}
			if want := tt.mapped.IsValid(); needsMapping(tt.p) != want {
				t.Errorf("needsMapping = %v, want %v", !want, want)
			}
		})
	}
}

func TestStepPort(t *testing.T) {
	for _, tt := range []struct {
		port uint16
		d    int
		want uint16
	}{
		{5000, 1, 5001}, {65535, 1, 1024}, {1024, -1, 65535}, {1100, -100, 65512}, {300, 1, 1025},
	} {
		if got := stepPort(tt.port, tt.d); got != tt.want {
			t.Errorf("stepPort(%d, %d) = %d, want %d", tt.port, tt.d, got, tt.want)
		}
	}
}
