package stun_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"peerlink/internal/coturn"
	"peerlink/stun"
	"peerlink/stun/stuntest"
)

func lookBinary(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed: install the Debian package %s", name, pkg)
	}
	return p
}

func runTool(t *testing.T, timeout time.Duration, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s %v timed out:\n%s", bin, args, out)
	}
	// Both tools exit with codes that say little; their output is what counts.
	_ = err
	return string(out)
}

// TestInteropStunClient runs the RFC 3489 client of Debian's stun-client against a
// peerlink server with RFC 5780, and against one with a single address.
func TestInteropStunClient(t *testing.T) {
	bin := lookBinary(t, "stun", "stun-client")
	s := stuntest.Start(t, stuntest.Options{RFC5780: true, Config: stun.Config{Software: "peerlink"}})
	out := runTool(t, 60*time.Second, bin, s.UDPAddr(0).String(), "-v")
	for _, want := range []string{
		"MappedAddress = 127.0.0.1:",
		"SourceAddress = " + s.UDPAddr(0).String(),
		"SourceAddress = " + s.UDPAddr(stun.ChangeIP).String(),
		"SourceAddress = " + s.UDPAddr(stun.ChangePort).String(),
		"ChangedAddress = " + s.UDPAddr(stun.ChangeIP|stun.ChangePort).String(),
		"ServerName = peerlink",
		"test I = 1", "test II = 1", "test III = 1", "test I(2) = 1",
		"Primary: Open",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("stun output lacks %q:\n%s", want, out)
		}
	}
	if st := s.Stats(); st.ChangedResponses < 2 || st.Dropped.NotSTUN != 0 || st.BadRequest != 0 {
		t.Errorf("stats %+v", st)
	}

	single := stuntest.Start(t, stuntest.Options{})
	out = runTool(t, 60*time.Second, bin, single.UDPAddr(0).String(), "-v")
	if !strings.Contains(out, "MappedAddress = 127.0.0.1:") || !strings.Contains(out, "ErrorCode = 4 20") {
		t.Errorf("single address: want a mapped address and 420 for the changes:\n%s", out)
	}
	if st := single.Stats(); st.Responses == 0 || st.UnknownAttribute == 0 {
		t.Errorf("single address stats %+v", st)
	}
}

// natLines returns turnutils_natdiscovery's verdicts.
func natLines(out string) []string {
	var lines []string
	for l := range strings.Lines(out) {
		if strings.HasPrefix(l, "NAT with") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return lines
}

// TestInteropNATDiscovery runs coturn's RFC 5780 client against peerlink and against
// coturn itself on 127.0.0.1 and 127.0.0.2: both must get the same verdicts. As root it
// also drops the answers sent from the alternate IP, which makes loopback look like an
// address-dependent filter, and compares again.
func TestInteropNATDiscovery(t *testing.T) {
	bin := lookBinary(t, "turnutils_natdiscovery", "coturn")
	s := stuntest.Start(t, stuntest.Options{RFC5780: true})
	discover := func(port uint16) []string {
		out := runTool(t, 60*time.Second, bin, "-m", "-f", "-p", fmt.Sprint(port), "127.0.0.1")
		lines := natLines(out)
		if len(lines) != 2 {
			t.Errorf("port %d: want a mapping and a filtering verdict:\n%s", port, out)
		}
		return lines
	}
	got := discover(s.UDPAddr(0).Port())
	want := []string{"NAT with Endpoint Independent Mapping!", "NAT with Endpoint Independent Filtering!"}
	if !slices.Equal(got, want) {
		t.Errorf("peerlink: %q, want %q", got, want)
	}

	ref := startCoturn(t)
	if ref != 0 {
		if cg := discover(ref); !slices.Equal(cg, got) {
			t.Errorf("coturn says %q, peerlink %q", cg, got)
		}
	}

	t.Run("alternate IP filtered", func(t *testing.T) {
		if testing.Short() {
			t.Skip("waits for natdiscovery's 3 s timeouts")
		}
		if os.Geteuid() != 0 {
			t.Skip("needs root for nftables")
		}
		ports := []uint16{s.UDPAddr(0).Port(), s.UDPAddr(stun.ChangePort).Port()}
		if ref != 0 {
			ports = append(ports, ref, ref+1)
		}
		dropFrom(t, stuntest.AltIP, ports)
		var wg sync.WaitGroup
		var pl, ct []string
		wg.Go(func() { pl = discover(s.UDPAddr(0).Port()) })
		if ref != 0 {
			wg.Go(func() { ct = discover(ref) })
		}
		wg.Wait()
		if len(pl) != 2 || pl[1] != "NAT with Address Dependent Filtering!" {
			t.Errorf("peerlink: %q, want address-dependent filtering", pl)
		}
		if ref != 0 && !slices.Equal(pl, ct) {
			t.Errorf("coturn says %q, peerlink %q", ct, pl)
		}
	})
}

// startCoturn runs coturn with RFC 5780 on 127.0.0.1 and 127.0.0.2 for the test and
// returns its primary port, or 0 when coturn is not installed.
func startCoturn(t *testing.T) uint16 {
	t.Helper()
	ips := []netip.Addr{netip.MustParseAddr("127.0.0.1"), stuntest.AltIP}
	port, err := coturn.FreePorts(ips...)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := coturn.Start(context.Background(), coturn.Options{IPs: ips, Port: port, Dir: t.TempDir()})
	if errors.Is(err, coturn.ErrNotInstalled) {
		t.Logf("no comparison with coturn: %v", err)
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return port
}

// dropFrom makes the kernel drop UDP from ip with one of the source ports, for the rest of
// the test.
func dropFrom(t *testing.T, ip netip.Addr, ports []uint16) {
	t.Helper()
	table := fmt.Sprintf("peerlink_stun_test_%d", os.Getpid())
	var ps []string
	for _, p := range ports {
		ps = append(ps, fmt.Sprint(p))
	}
	rules := fmt.Sprintf(`table inet %s {
	chain input {
		type filter hook input priority 0; policy accept;
		ip saddr %v udp sport { %s } drop
	}
}
`, table, ip, strings.Join(ps, ", "))
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("nft", "delete", "table", "inet", table).CombinedOutput(); err != nil {
			t.Errorf("nft delete: %v\n%s", err, out)
		}
	})
}
