package main

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"peerlink/internal/benchrun"
)

func TestSelected(t *testing.T) {
	tests := []struct {
		only    string
		want    []string
		wantErr bool
	}{
		{"", sections, false},
		{"connect,stun", []string{"stun", "connect"}, false},
		{" relay , relay,", []string{"relay"}, false},
		{"stun,nope", nil, true},
	}
	for _, tt := range tests {
		got, err := selected(tt.only)
		if (err != nil) != tt.wantErr || !slices.Equal(got, tt.want) {
			t.Errorf("selected(%q) = %v, %v; want %v (error %v)", tt.only, got, err, tt.want, tt.wantErr)
		}
	}
}

// stunOutput is stun/internal/loadgen -json's output: text first, JSON last.
const stunOutput = `loadgen: 32 sockets x 16 in flight
{"sockets":32,"window":16,"seconds":1,"cpus":2,"servers":["peerlink","coturn","echo"],"rounds":[` +
	`{"round":1,"server":"peerlink","reqPerSec":200000,"reqPerCPUSecond":300000},` +
	`{"round":1,"server":"coturn","reqPerSec":100000,"reqPerCPUSecond":100000},` +
	`{"round":1,"server":"echo","reqPerSec":250000,"reqPerCPUSecond":400000},` +
	`{"round":2,"server":"peerlink","reqPerSec":220000,"reqPerCPUSecond":280000},` +
	`{"round":2,"server":"coturn","reqPerSec":110000,"reqPerCPUSecond":100000},` +
	`{"round":2,"server":"echo","reqPerSec":240000,"reqPerCPUSecond":350000},` +
	`{"round":3,"server":"peerlink","reqPerSec":90000,"reqPerCPUSecond":120000},` +
	`{"round":3,"server":"coturn","reqPerSec":100000,"reqPerCPUSecond":100000},` +
	`{"round":3,"server":"echo","reqPerSec":260000,"reqPerCPUSecond":380000}]}
`

// relayOutput is relay/internal/bench -json's output.
const relayOutput = `{"coturnVersion":"4.6.1","size":1200,"messagesPerSession":500,"runs":[` +
	`{"server":"peerlink","mode":"c2c","sessions":"10","msgsPerSec":1200,"msgsPerCPUSecond":200000,"lossPercent":0},` +
	`{"server":"coturn","mode":"c2c","sessions":"10","msgsPerSec":1200,"msgsPerCPUSecond":60000,"lossPercent":0},` +
	`{"server":"peerlink","mode":"c2c","sessions":"100","msgsPerSec":3100,"msgsPerCPUSecond":190000,"lossPercent":0.5},` +
	`{"server":"coturn","mode":"c2c","sessions":"100","msgsPerSec":3000,"msgsPerCPUSecond":58000,"lossPercent":3.4}],` +
	`"idleAllocations":200,"idleBytesPerAllocation":{"coturn":[22528,22016,23552],"peerlink":[2048,1024,3072]}}
`

func figure(t *testing.T, r *benchrun.Report, name, unit string) benchrun.Figure {
	t.Helper()
	for _, f := range r.Figures {
		if f.Name == name && f.Unit == unit {
			return f
		}
	}
	t.Fatalf("no figure %q in %q", name, unit)
	return benchrun.Figure{}
}

func TestAddSTUN(t *testing.T) {
	r := &benchrun.Report{}
	if err := addSTUN(r, []byte(stunOutput)); err != nil {
		t.Fatal(err)
	}
	if f := figure(t, r, "peerlink", "req/s"); f.Median != 200000 || f.Min != 90000 || f.Max != 220000 || f.N != 3 {
		t.Errorf("peerlink req/s: %+v", f.Summary)
	}
	// Ratios pair the servers' runs round by round: 2, 2, 0.9.
	if f := figure(t, r, "peerlink/coturn", "x req/s"); f.Median != 2 || f.Min != 0.9 || f.Target == nil || !f.Target.Pass {
		t.Errorf("peerlink/coturn req/s: %+v target %+v", f.Summary, f.Target)
	}
	if f := figure(t, r, "peerlink/coturn", "x req/CPU-s"); f.Median != 2.8 || !f.Target.Pass {
		t.Errorf("peerlink/coturn req/CPU-s: %+v target %+v", f.Summary, f.Target)
	}
	if len(r.Problems) != 0 {
		t.Errorf("problems: %v", r.Problems)
	}
	if err := addSTUN(&benchrun.Report{}, []byte("no json here")); err == nil {
		t.Error("addSTUN took output without JSON")
	}
}

func TestAddRelay(t *testing.T) {
	r := &benchrun.Report{}
	if err := addRelay(r, []byte(relayOutput)); err != nil {
		t.Fatal(err)
	}
	if f := figure(t, r, "peerlink/coturn, 100 sessions", "x msgs/CPU-s"); f.N != 1 || f.Median < 3.27 || f.Median > 3.28 || !f.Target.Pass {
		t.Errorf("relay 100 sessions per CPU ratio: %+v", f)
	}
	if f := figure(t, r, "coturn, 100 sessions", "% loss"); f.Median != 3.4 {
		t.Errorf("coturn loss: %+v", f.Summary)
	}
	if f := figure(t, r, "peerlink idle allocation", "KiB RSS"); f.Median != 2 || f.Min != 1 || f.Max != 3 || f.N != 3 {
		t.Errorf("peerlink idle allocation: %+v", f.Summary)
	}
}

// TestRender is a smoke test of the orchestrator's output: the figures of both load
// generators render as one table and as JSON that decodes.
func TestRender(t *testing.T) {
	r := &benchrun.Report{Machine: benchrun.ThisMachine()}
	if err := addSTUN(r, []byte(stunOutput)); err != nil {
		t.Fatal(err)
	}
	if err := addRelay(r, []byte(relayOutput)); err != nil {
		t.Fatal(err)
	}
	var table bytes.Buffer
	if err := r.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"raw UDP echo (limit)", "peerlink/coturn, 10 sessions", "msgs/CPU-s", "≥ 1.50  pass", "KiB RSS"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, table.String())
		}
	}
	if strings.Contains(table.String(), "missed:") {
		t.Errorf("table reports a miss:\n%s", table.String())
	}
	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back benchrun.Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Figures) != len(r.Figures) {
		t.Fatalf("JSON: %v, %d figures of %d", err, len(back.Figures), len(r.Figures))
	}
}
