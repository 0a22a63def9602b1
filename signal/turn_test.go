package signal_test

import (
	"bytes"
	"fmt"
	"net"
	"os/exec"
	"testing"
	"time"

	pionstun "github.com/pion/stun/v3"

	"peerlink/identity"
	"peerlink/signal"
	"peerlink/signal/signaltest"
)

// TestTURNCredentialsCoturn: credentials the rendezvous server issues open a TURN
// allocation on a real coturn configured with the same secret (use-auth-secret), and
// wrong or expired ones do not.
func TestTURNCredentialsCoturn(t *testing.T) {
	bin, err := exec.LookPath("turnserver")
	if err != nil {
		t.Skip("turnserver (coturn) not installed; make deps installs it")
	}
	const secret = "rendezvous-and-turn-share-this"
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := pc.LocalAddr().(*net.UDPAddr).Port
	pc.Close()
	// UDP only: a TCP listener on the same port could find it taken (the port was free
	// for UDP), and coturn then never starts serving.
	cmd := exec.Command(bin, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", fmt.Sprintf("--listening-port=%d", port),
		"--no-tls", "--no-dtls", "--no-tcp", "--no-cli", "--use-auth-secret", "--static-auth-secret="+secret, "--realm=peerlink.test",
		"--log-file=stdout", "--simple-log", "--pidfile="+t.TempDir()+"/turn.pid", "--userdb="+t.TempDir()+"/turndb")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("coturn output:\n%s", out.Bytes())
		}
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)

	srv := signaltest.Start(t, signal.Config{TURNSecret: secret}, false)
	cred, err := srv.Dial(t, nil).TURNCredentials(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	id, _ := identity.Generate()
	expired := signal.NewTURNCredentials(secret, id.NodeID(), time.Now().Add(-2*time.Hour), time.Hour)

	var code int
	deadline := time.Now().Add(30 * time.Second) // coturn can take seconds to start on a busy machine
	for {
		code, err = turnAllocate(addr, cred.Username, cred.Password)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond) // coturn still starting
	}
	if err != nil || code != 0 {
		t.Fatalf("allocation with issued credentials: code %d, %v", code, err)
	}
	for _, tc := range []struct{ name, user, pass string }{
		{"wrong password", cred.Username, signal.TURNPassword("another secret", cred.Username)},
		{"expired", expired.Username, expired.Password},
	} {
		code, err := turnAllocate(addr, tc.user, tc.pass)
		if err != nil || code != 401 {
			t.Errorf("%s: code %d, %v; want 401", tc.name, code, err)
		}
	}
}

// turnAllocate runs a TURN Allocate with long-term credentials (RFC 8656) and returns 0
// on success or the STUN error code.
func turnAllocate(addr, user, pass string) (int, error) {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	udp := pionstun.RawAttribute{Type: pionstun.AttrRequestedTransport, Value: []byte{17, 0, 0, 0}}
	allocate := pionstun.NewType(pionstun.MethodAllocate, pionstun.ClassRequest)
	resp, err := stunRoundTrip(c, pionstun.TransactionID, allocate, udp)
	if err != nil {
		return 0, err
	}
	var ec pionstun.ErrorCodeAttribute
	if ec.GetFrom(resp) != nil || ec.Code != 401 {
		return 0, fmt.Errorf("unauthenticated allocate answered %v", resp)
	}
	var realm pionstun.Realm
	var nonce pionstun.Nonce
	if err := realm.GetFrom(resp); err != nil {
		return 0, err
	}
	if err := nonce.GetFrom(resp); err != nil {
		return 0, err
	}
	resp, err = stunRoundTrip(c, pionstun.TransactionID, allocate, udp, pionstun.NewUsername(user), realm, nonce,
		pionstun.NewLongTermIntegrity(user, realm.String(), pass))
	if err != nil {
		return 0, err
	}
	if resp.Type.Class == pionstun.ClassSuccessResponse {
		return 0, nil
	}
	if err := ec.GetFrom(resp); err != nil {
		return 0, err
	}
	return int(ec.Code), nil
}

func stunRoundTrip(c net.Conn, setters ...pionstun.Setter) (*pionstun.Message, error) {
	req, err := pionstun.Build(setters...)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 1500)
	for range 3 {
		if _, err := c.Write(req.Raw); err != nil {
			return nil, err
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err != nil {
			continue
		}
		resp := &pionstun.Message{Raw: append([]byte(nil), buf[:n]...)}
		if resp.Decode() == nil && resp.TransactionID == req.TransactionID {
			return resp, nil
		}
	}
	return nil, fmt.Errorf("no answer from TURN server")
}
