package mdns

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"peerlink/netlab"
	"peerlink/netlab/netlabtest"
)

// startAvahi runs a private system bus and avahi-daemon inside h's namespace and returns
// the environment avahi's client tools need to reach them. It fails (not skips) when
// avahi cannot be started: the test only runs as root, where the tools must be there.
func startAvahi(t *testing.T, h *netlab.Host) []string {
	t.Helper()
	for _, tool := range []string{"dbus-daemon", "avahi-daemon", "avahi-browse", "avahi-publish"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (apt-get install avahi-daemon avahi-utils dbus-daemon): %v", tool, err)
		}
	}
	dir := t.TempDir()
	bus := filepath.Join(dir, "bus")
	busConf := fmt.Sprintf(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
`, bus)
	avahiConf := `[server]
host-name=avahi-lab
use-ipv4=yes
use-ipv6=no
allow-interfaces=eth0
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
`
	for name, body := range map[string]string{"bus.conf": busConf, "avahi-daemon.conf": avahiConf} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	env := append(os.Environ(), "DBUS_SYSTEM_BUS_ADDRESS=unix:path="+bus)
	start := func(name string, args ...string) {
		cmd := h.Command(context.Background(), name, args...)
		cmd.Env = env
		out := &strings.Builder{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting %s: %v", name, err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
			if t.Failed() {
				t.Logf("%s output:\n%s", name, out)
			}
		})
	}
	start("dbus-daemon", "--config-file="+filepath.Join(dir, "bus.conf"), "--nofork", "--nopidfile")
	waitFor(t, 5*time.Second, "the private D-Bus socket", func() bool { _, err := os.Stat(bus); return err == nil })
	// A pid file left by a killed earlier run would make avahi-daemon refuse to start.
	os.Remove("/run/avahi-daemon/pid")
	start("avahi-daemon", "--no-drop-root", "--no-chroot", "--no-rlimits", "-f", filepath.Join(dir, "avahi-daemon.conf"))
	waitFor(t, 10*time.Second, "avahi-daemon on D-Bus", func() bool {
		cmd := exec.Command("avahi-browse", "-apt")
		cmd.Env = env
		return cmd.Run() == nil
	})
	return env
}

func waitFor(t *testing.T, within time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAvahiSeesPeerlink: avahi-browse, through avahi-daemon on another host of the LAN,
// resolves the service a peerlink Advertiser publishes.
func TestAvahiSeesPeerlink(t *testing.T) {
	lan := netlabtest.StartLAN(t, netlab.LANConfig{Hosts: 2})
	env := startAvahi(t, lan.Hosts[0])
	id := testID(20)
	inHost(t, lan.Hosts[1], Config{}, Service{NodeID: id, Port: 4300, Profile: "full-cone"})
	var line string
	waitFor(t, 15*time.Second, "avahi-browse to resolve the peerlink service", func() bool {
		cmd := exec.Command("avahi-browse", "-rpt", ServiceType)
		cmd.Env = env
		out, _ := cmd.Output()
		for l := range strings.Lines(string(out)) {
			// =;eth0;IPv4;<instance>;_peerlink._udp;local;<host>;<address>;<port>;<txt>
			if strings.HasPrefix(l, "=;") && strings.Contains(l, id.String()) {
				line = strings.TrimSpace(l)
				return true
			}
		}
		return false
	})
	t.Logf("avahi-browse: %s", line)
	f := strings.SplitN(line, ";", 10)
	if len(f) != 10 {
		t.Fatalf("avahi-browse line %q", line)
	}
	if f[3] != id.String() || f[4] != ServiceType || f[6] != id.String()+".local" ||
		f[7] != netlab.LANAddr(1).String() || f[8] != "4300" {
		t.Errorf("avahi resolved %q", line)
	}
	for _, kv := range []string{`"node=` + id.String() + `"`, `"v=1"`, `"profile=full-cone"`} {
		if !strings.Contains(f[9], kv) {
			t.Errorf("TXT %s lacks %s", f[9], kv)
		}
	}
}

// TestPeerlinkSeesAvahi: a peerlink Browser finds a service avahi-publish registers
// with avahi-daemon on another host, and loses it when avahi withdraws it.
func TestPeerlinkSeesAvahi(t *testing.T) {
	lan := netlabtest.StartLAN(t, netlab.LANConfig{Hosts: 2})
	env := startAvahi(t, lan.Hosts[0])
	id := testID(21)
	cfg := Config{}
	if dir := os.Getenv("MDNS_CAPTURE"); dir != "" {
		// Refreshes the fuzz seed corpus with real avahi packets.
		n := 0
		cfg.tap = func(b []byte, _ netip.AddrPort, _ int) {
			n++
			os.WriteFile(filepath.Join(dir, "avahi-"+strconv.Itoa(n)), fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", b), 0o644)
		}
	}
	_, b := inHost(t, lan.Hosts[1], cfg, Service{})
	pub := exec.Command("avahi-publish", "-s", id.String(), ServiceType, "4242", "node="+id.String(), "v=1", "profile=avahi")
	pub.Env = env
	out := &strings.Builder{}
	pub.Stdout, pub.Stderr = out, out
	if err := pub.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		pub.Process.Kill()
		pub.Wait()
	}()
	ev, took := waitEvent(t, b, Found, id, 15*time.Second)
	t.Logf("found avahi's service after %v: %+v", took.Round(time.Millisecond), ev.Peer)
	p := ev.Peer
	if p.Port != 4242 || p.Profile != "avahi" || p.Host != "avahi-lab.local." || len(p.Addrs) != 1 || p.Addrs[0] != netlab.LANAddr(0) {
		t.Errorf("peer %+v (avahi-publish said %q)", p, out)
	}
	// avahi-publish withdraws the service (with a goodbye) when it is interrupted.
	pub.Process.Signal(os.Interrupt)
	pub.Wait()
	_, took = waitEvent(t, b, Lost, id, 10*time.Second)
	t.Logf("lost after avahi-publish ended: %v", took.Round(time.Millisecond))
}
