package detect

import (
	"net/netip"
	"testing"

	"peerlink/nat"
)

func TestAllocationOf(t *testing.T) {
	tests := []struct {
		name  string
		ports [][2]uint16
		want  nat.Allocation
		delta int
		sure  bool
	}{
		{"preserved", [][2]uint16{{4000, 4000}, {4001, 4001}, {5000, 5000}, {6000, 6000}}, nat.AllocationPP, 0, true},
		{"contiguous +1", [][2]uint16{{4000, 20000}, {4001, 20001}, {5000, 20002}, {333, 20003}}, nat.AllocationPC, 1, true},
		{"contiguous +2", [][2]uint16{{4000, 20000}, {4001, 20002}, {5000, 20004}, {333, 20006}}, nat.AllocationPC, 2, true},
		{"contiguous, one outlier", [][2]uint16{{4000, 20000}, {4001, 20001}, {5000, 20005}, {333, 20006}}, nat.AllocationPC, 1, false},
		{"random", [][2]uint16{{4000, 31000}, {4001, 52011}, {5000, 1999}, {333, 40404}}, nat.AllocationRD, 0, true},
		{"preserved but one collision", [][2]uint16{{4000, 4000}, {4001, 4001}, {5000, 5000}, {6000, 6100}}, nat.AllocationPP, 0, false},
		{"too few", [][2]uint16{{4000, 4000}}, nat.AllocationUnknown, 0, false},
		{"large steps are not contiguity", [][2]uint16{{1, 1000}, {2, 2000}, {3, 3000}, {4, 4000}}, nat.AllocationRD, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, d, sure := allocationOf(tt.ports)
			if a != tt.want || d != tt.delta || sure != tt.sure {
				t.Errorf("allocationOf = %v, %d, %v; want %v, %d, %v", a, d, sure, tt.want, tt.delta, tt.sure)
			}
		})
	}
}

func TestMappingFromObservers(t *testing.T) {
	ap := netip.MustParseAddrPort
	res := func(server, mapped string) ServerResult {
		return ServerResult{Addr: ap(server), Mapped: ap(mapped)}
	}
	tests := []struct {
		name  string
		in    []ServerResult
		want  nat.Mapping
		exact bool
	}{
		{"same everywhere", []ServerResult{res("1.1.1.1:3478", "9.9.9.9:5000"), res("2.2.2.2:3478", "9.9.9.9:5000")}, nat.MappingEI, true},
		{"differs by host, same per host", []ServerResult{res("1.1.1.1:3478", "9.9.9.9:5000"), res("1.1.1.1:3479", "9.9.9.9:5000"), res("2.2.2.2:3478", "9.9.9.9:5001")}, nat.MappingHD, true},
		{"differs by port", []ServerResult{res("1.1.1.1:3478", "9.9.9.9:5000"), res("1.1.1.1:3479", "9.9.9.9:5002"), res("2.2.2.2:3478", "9.9.9.9:5001")}, nat.MappingPD, true},
		{"differs, no same-host pair: at least HD", []ServerResult{res("1.1.1.1:3478", "9.9.9.9:5000"), res("2.2.2.2:3478", "9.9.9.9:5001")}, nat.MappingHD, false},
		{"one observer", []ServerResult{res("1.1.1.1:3478", "9.9.9.9:5000")}, nat.MappingUnknown, false},
		{"two ports of one host agree", []ServerResult{res("1.1.1.1:3478", "9.9.9.9:5000"), res("1.1.1.1:3479", "9.9.9.9:5000")}, nat.MappingUnknown, false},
		{"silent observers ignored", []ServerResult{res("1.1.1.1:3478", "9.9.9.9:5000"), {Addr: ap("2.2.2.2:3478")}, res("3.3.3.3:3478", "9.9.9.9:5000")}, nat.MappingEI, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, exact, _ := mappingFromObservers(tt.in); got != tt.want || exact != tt.exact {
				t.Errorf("mappingFromObservers = %v exact %v, want %v exact %v", got, exact, tt.want, tt.exact)
			}
		})
	}
}
