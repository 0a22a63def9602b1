package relay_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"peerlink/relay"
	"peerlink/relay/relaytest"
)

// Interoperability with coturn, the reference TURN implementation: its test client
// against peerlink's relay, and peerlink's client against its server.

func needCoturn(t *testing.T, bin string) string {
	t.Helper()
	path, err := exec.LookPath(bin)
	if err != nil {
		t.Skipf("%s not found: install the Debian package coturn (apt-get install coturn)", bin)
	}
	return path
}

var (
	reTotals = regexp.MustCompile(`start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$`)
	reLost   = regexp.MustCompile(`Total lost packets (\d+)`)
)

// uclientResult runs turnutils_uclient and returns messages sent, received and lost.
func runUclient(t *testing.T, args ...string) (sent, recv, lost int) {
	t.Helper()
	bin := needCoturn(t, "turnutils_uclient")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("turnutils_uclient %v: %v\n%s", args, err, tail(out))
	}
	var totals, lostM [][]byte
	for _, line := range bytes.Split(out, []byte("\n")) {
		if m := reTotals.FindSubmatch(line); m != nil {
			totals = m
		}
		if m := reLost.FindSubmatch(line); m != nil {
			lostM = m
		}
	}
	if totals == nil || lostM == nil {
		t.Fatalf("turnutils_uclient %v: no totals in its output:\n%s", args, tail(out))
	}
	sent, _ = strconv.Atoi(string(totals[1]))
	recv, _ = strconv.Atoi(string(totals[2]))
	lost, _ = strconv.Atoi(string(lostM[1]))
	return sent, recv, lost
}

func tail(b []byte) []byte {
	if len(b) > 3000 {
		return b[len(b)-3000:]
	}
	return b
}

// TestUclientClientToClient runs coturn's load client in client-to-client mode (each
// client relays to another client's relayed address, RTCP allocations with EVEN-PORT
// and RESERVATION-TOKEN included) over UDP and TCP, paced, and wants every message
// through.
func TestUclientClientToClient(t *testing.T) {
	needCoturn(t, "turnutils_uclient")
	clients, msgs := 100, 500
	switch {
	case testing.Short():
		clients, msgs = 8, 50
	case raceEnabled:
		// The race detector slows the relay several times over, and CI runs other
		// packages beside it: a third of the load keeps the test about the relay
		// losing nothing, not about a starved machine's socket buffers.
		clients, msgs = 32, 300
	}
	for _, transport := range []string{"udp", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			t.Parallel()
			// uclient loads the relay from one address, as no real client does: the
			// per-source limits would refuse it first.
			r := relaytest.Start(t, relay.Config{PerSourceQuota: -1, RequestLimit: relay.RequestLimit{Disabled: true}})
			port := r.UDP.Port()
			args := []string{"-y", "-l", "1200", "-m", strconv.Itoa(clients), "-n", strconv.Itoa(msgs), "-z", "20",
				"-u", relaytest.User, "-w", relaytest.Password}
			if transport == "tcp" {
				port = r.TCP.Port()
				args = append(args, "-t")
			}
			args = append(args, "-p", strconv.Itoa(int(port)), "127.0.0.1")
			sent, recv, lost := runUclient(t, args...)
			// uclient rounds -m up to a multiple of 4 in this mode.
			want := (clients + 3) / 4 * 4 * msgs
			if sent != want || recv != want || lost != 0 {
				t.Fatalf("sent %d, received %d, lost %d; want %d, %d, 0", sent, recv, lost, want, want)
			}
			t.Logf("%s: %d messages relayed, none lost", transport, recv)
		})
	}
}

// TestUclientRESTCredentials: coturn's client computing TURN REST credentials from the
// shared secret, as coturn's use-auth-secret expects, against peerlink's relay.
func TestUclientRESTCredentials(t *testing.T) {
	needCoturn(t, "turnutils_uclient")
	r := relaytest.Start(t, relay.Config{Secret: "shared-secret"})
	sent, recv, lost := runUclient(t, "-y", "-c", "-m", "2", "-n", "20", "-z", "5",
		"-u", "node-a", "-W", "shared-secret", "-p", strconv.Itoa(int(r.UDP.Port())), "127.0.0.1")
	if sent != 40 || recv != 40 || lost != 0 {
		t.Fatalf("sent %d, received %d, lost %d", sent, recv, lost)
	}
}

// coturn runs turnserver with a temporary configuration on a free port.
type coturn struct {
	port int
}

func startCoturn(t *testing.T, extra ...string) *coturn {
	t.Helper()
	bin := needCoturn(t, "turnserver")
	dir := t.TempDir()
	port := freePort(t)
	relayBase := 20000 + rand.IntN(400)*100
	conf := fmt.Sprintf(`listening-ip=127.0.0.1
listening-port=%d
relay-ip=127.0.0.1
min-port=%d
max-port=%d
realm=coturn.test
fingerprint
no-tls
no-dtls
no-cli
allow-loopback-peers
no-software-attribute
userdb=%s
pidfile=%s
log-file=%s
simple-log
no-stdout-log
`, port, relayBase, relayBase+99, filepath.Join(dir, "turndb"), filepath.Join(dir, "pid"), filepath.Join(dir, "log"))
	for _, e := range extra {
		conf += e + "\n"
	}
	path := filepath.Join(dir, "turnserver.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Fatalf("turnserver did not come up: %v\n%s", err, tail(log))
		}
		time.Sleep(50 * time.Millisecond)
	}
	return &coturn{port: port}
}

// freePort finds a port free for both UDP and TCP on 127.0.0.1.
func freePort(t *testing.T) int {
	t.Helper()
	for range 100 {
		port := 30000 + rand.IntN(20000)
		u, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		u.Close()
		if err != nil {
			continue
		}
		l.Close()
		return port
	}
	t.Fatal("no free port")
	return 0
}

// TestClientAgainstCoturn: peerlink's client allocates through coturn over UDP and
// TCP, with fixed and with TURN REST credentials, and relays between two allocations.
func TestClientAgainstCoturn(t *testing.T) {
	ctx := context.Background()
	t.Run("long-term credentials", func(t *testing.T) {
		ct := startCoturn(t, "lt-cred-mech", "user=alice:wonderland")
		server := fmt.Sprintf("127.0.0.1:%d", ct.port)
		for _, transport := range []relay.Transport{relay.UDP, relay.TCP} {
			a, err := relay.Dial(ctx, relay.ClientConfig{Server: server, Transport: transport, Username: "alice", Password: "wonderland"})
			if err != nil {
				t.Fatalf("%s: %v", transport, err)
			}
			b, err := relay.Dial(ctx, relay.ClientConfig{Server: server, Username: "alice", Password: "wonderland"})
			if err != nil {
				a.Close()
				t.Fatal(err)
			}
			exchange(t, a, b)
			a.Close()
			b.Close()
		}
	})
	t.Run("REST credentials", func(t *testing.T) {
		ct := startCoturn(t, "use-auth-secret", "static-auth-secret=shared-secret")
		user, pass := relay.RESTCredentials("shared-secret", "node-b", time.Now().Add(time.Hour))
		c, err := relay.Dial(ctx, relay.ClientConfig{Server: fmt.Sprintf("127.0.0.1:%d", ct.port), Username: user, Password: pass})
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		user, pass = relay.RESTCredentials("shared-secret", "node-b", time.Now().Add(-time.Minute))
		if c, err := relay.Dial(ctx, relay.ClientConfig{Server: fmt.Sprintf("127.0.0.1:%d", ct.port), Username: user, Password: pass}); err == nil {
			c.Close()
			t.Fatal("coturn accepted expired REST credentials: the test setup is wrong")
		}
	})
}
