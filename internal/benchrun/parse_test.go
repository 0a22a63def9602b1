package benchrun

import (
	"reflect"
	"testing"
	"time"
)

const goBenchOutput = `goos: linux
goarch: amd64
pkg: peerlink/natcache
cpu: AMD EPYC
BenchmarkCacheHit-2   	 5419245	       215.3 ns/op	       0 B/op	       0 allocs/op
BenchmarkCacheHit-2   	 5000000	       202 ns/op	       0 B/op	       0 allocs/op
BenchmarkDetectKernelLab50ms-2   	       5	 470123456 ns/op	       470.0 ms/detection
BenchmarkOdd-2   	       5	 bad ns/op
BenchmarkNoProcs 10 3 ns/op
--- BENCH: BenchmarkX
PASS
ok  	peerlink/natcache	3.1s
`

func TestParseGoBench(t *testing.T) {
	got := ParseGoBench(goBenchOutput)
	want := []Bench{
		{Name: "BenchmarkCacheHit", Iterations: 5419245, Metrics: map[string]float64{"ns/op": 215.3, "B/op": 0, "allocs/op": 0}},
		{Name: "BenchmarkCacheHit", Iterations: 5000000, Metrics: map[string]float64{"ns/op": 202, "B/op": 0, "allocs/op": 0}},
		{Name: "BenchmarkDetectKernelLab50ms", Iterations: 5, Metrics: map[string]float64{"ns/op": 470123456, "ms/detection": 470}},
		{Name: "BenchmarkNoProcs", Iterations: 10, Metrics: map[string]float64{"ns/op": 3}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ParseGoBench =\n%+v\nwant\n%+v", got, want)
	}
}

func FuzzParseGoBench(f *testing.F) {
	f.Add(goBenchOutput)
	f.Add("BenchmarkA-8 1 1 ns/op")
	f.Fuzz(func(t *testing.T, s string) {
		for _, b := range ParseGoBench(s) {
			if b.Iterations <= 0 || len(b.Metrics) == 0 {
				t.Fatalf("bad result %+v", b)
			}
		}
	})
}

// connectLog is the shape of TestConnectKernelLab's -v output.
const connectLog = `=== RUN   TestConnectKernelLab
relay listening on udp 203.0.113.10:3600
    netlab_test.go:247: 
        initiator        responder        plan                   method        first     direct
        none             none             direct(b) → relay      direct        413ms      718ms
        port-restricted  symmetric        birthday(b) → relay    punched       308ms     2.297s
        symmetric        symmetric        relay                  relayed       366ms         0s
        median time to direct for simple punching / direct pairs: 721ms (13 pairs)
        
--- PASS: TestConnectKernelLab (51.42s)
`

func TestParseConnectTable(t *testing.T) {
	got := ParseConnectTable(connectLog)
	want := []ConnectRow{
		{"none", "none", "direct(b) → relay", "direct", 413 * time.Millisecond, 718 * time.Millisecond},
		{"port-restricted", "symmetric", "birthday(b) → relay", "punched", 308 * time.Millisecond, 2297 * time.Millisecond},
		{"symmetric", "symmetric", "relay", "relayed", 366 * time.Millisecond, 0},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ParseConnectTable =\n%+v\nwant\n%+v", got, want)
	}
}

func FuzzParseConnectTable(f *testing.F) {
	f.Add(connectLog)
	f.Add("a b c direct 1ms 2ms")
	f.Fuzz(func(t *testing.T, s string) {
		for _, r := range ParseConnectTable(s) {
			if r.First < 0 || r.Direct < 0 || !connectMethods[r.Method] || r.Initiator == "" || r.Responder == "" {
				t.Fatalf("bad row %+v", r)
			}
		}
	})
}
