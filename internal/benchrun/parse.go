package benchrun

import (
	"bufio"
	"strconv"
	"strings"
	"time"
)

// Bench is one result line of `go test -bench` output.
type Bench struct {
	Name       string             // without the -GOMAXPROCS suffix
	Iterations int64              //
	Metrics    map[string]float64 // by unit: "ns/op", "ms/detection", ...
}

// ParseGoBench reads the result lines of `go test -bench` output (-count N gives N
// lines per benchmark) and ignores everything else.
func ParseGoBench(out string) []Bench {
	var bs []Bench
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// Name, iterations, then value-unit pairs.
		if len(f) < 4 || len(f)%2 != 0 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		it, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || it <= 0 {
			continue
		}
		b := Bench{Name: f[0], Iterations: it, Metrics: map[string]float64{}}
		if i := strings.LastIndexByte(b.Name, '-'); i > 0 {
			if _, err := strconv.Atoi(b.Name[i+1:]); err == nil {
				b.Name = b.Name[:i]
			}
		}
		ok := true
		for k := 2; k+1 < len(f); k += 2 {
			v, err := strconv.ParseFloat(f[k], 64)
			if err != nil {
				ok = false
				break
			}
			b.Metrics[f[k+1]] = v
		}
		if ok {
			bs = append(bs, b)
		}
	}
	return bs
}

// ConnectRow is one NAT pair of the connect kernel-lab table.
type ConnectRow struct {
	Initiator string        `json:"initiator"`
	Responder string        `json:"responder"`
	Plan      string        `json:"plan"`
	Method    string        `json:"method"`
	First     time.Duration `json:"firstByteNs"` // to the first byte, over any path
	Direct    time.Duration `json:"directNs"`    // to the direct path; 0 when relayed
}

// connectMethods are the methods the table can show; a row is recognised by one.
var connectMethods = map[string]bool{"direct": true, "punched": true, "relayed": true}

// ParseConnectTable reads the rows of the table TestConnectKernelLab logs:
// initiator, responder, a plan that may hold spaces, method, time to first byte and
// time to direct. Other lines are ignored.
func ParseConnectTable(out string) []ConnectRow {
	var rows []ConnectRow
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || !connectMethods[f[len(f)-3]] {
			continue
		}
		first, err1 := time.ParseDuration(f[len(f)-2])
		direct, err2 := time.ParseDuration(f[len(f)-1])
		if err1 != nil || err2 != nil || first < 0 || direct < 0 {
			continue
		}
		rows = append(rows, ConnectRow{Initiator: f[0], Responder: f[1], Plan: strings.Join(f[2:len(f)-3], " "),
			Method: f[len(f)-3], First: first, Direct: direct})
	}
	return rows
}
