package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var binary string

// TestMain builds the real peerlink binary once; the tests run it as a user would.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "peerlink-cli")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "peerlink")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		panic("building peerlink: " + err.Error() + "\n" + string(out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// peerlink runs the binary and returns stdout, stderr and the exit code.
func peerlink(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binary, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &ee):
		return stdout.String(), stderr.String(), ee.ExitCode()
	}
	t.Fatalf("running peerlink %v: %v", args, err)
	return "", "", -1
}

func TestUsageAndExitCodes(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{nil, 2, "Usage: peerlink <command>"},
		{[]string{"--help"}, 0, "netcheck"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"netcheck"}, 2, "no STUN observers"},
		{[]string{"netcheck", "--bogus"}, 2, "flag provided but not defined"},
		{[]string{"netcheck", "-h"}, 0, "Examples:"},
		{[]string{"version"}, 0, "peerlink"},
	}
	for _, tt := range tests {
		stdout, stderr, code := peerlink(t, tt.args...)
		if code != tt.code || !strings.Contains(stdout+stderr, tt.contains) {
			t.Errorf("peerlink %v: exit %d, want %d; output %q does not contain %q", tt.args, code, tt.code, stdout+stderr, tt.contains)
		}
	}
}

func TestNetcheckLocalJSON(t *testing.T) {
	stdout, stderr, code := peerlink(t, "netcheck", "--local", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var out map[string]any
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, stdout)
	}
	for _, k := range []string{"mapping", "filtering", "allocation", "public_ip", "public_port", "port_delta", "hairpinning", "confidence", "detected_at"} {
		if _, ok := out[k]; !ok {
			t.Errorf("JSON lacks %q: %s", k, stdout)
		}
	}
	// On loopback there is no NAT.
	if out["nat_type"] != "open" || out["mapping"] != "ei" || out["filtering"] != "ei" || out["public_ip"] != "127.0.0.1" {
		t.Errorf("loopback netcheck: %s", stdout)
	}
}

func TestNetcheckReadable(t *testing.T) {
	stdout, stderr, code := peerlink(t, "netcheck", "--local")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"no NAT (open internet)", "mapping:", "endpoint-independent", "stun+rfc5780"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("report lacks %q:\n%s", want, stdout)
		}
	}
}

func TestLabSelftest(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("kernel NAT lab needs root (run as root or via make test)")
	}
	stdout, stderr, code := peerlink(t, "lab", "selftest", "--kinds", "port-restricted,symmetric-seq", "--json")
	if code != 0 {
		t.Fatalf("lab selftest exit %d\n%s\n%s", code, stdout, stderr)
	}
	if !strings.Contains(stdout, "port-restricted") || !strings.Contains(stdout, "symmetric-seq") {
		t.Errorf("selftest JSON lacks the sites: %s", stdout)
	}
	// Other tests may run labs at the same time: look for this run's namespaces only.
	m := regexp.MustCompile(`run=([0-9a-f]+)`).FindStringSubmatch(stderr)
	if m == nil {
		t.Fatalf("selftest did not log its run ID: %s", stderr)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "plab-"+m[1]+"-") {
		t.Errorf("namespaces of run %s left behind: %s", m[1], out)
	}
}
