package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCat pipes data both ways between `peerlink cat --listen` and `peerlink cat <node>`
// (real binaries, rendezvous and STUN on loopback): each side's stdout is exactly the
// other's stdin, and both exit 0.
func TestCat(t *testing.T) {
	server, stunAddr := servers(t)
	toClient := make([]byte, 3<<20)
	toListener := make([]byte, 1<<20+17)
	rand.Read(toClient)
	rand.Read(toListener)

	key := filepath.Join(t.TempDir(), "listener.key")
	node := nodeIDOf(t, key)
	lis := exec.Command(binary, "cat", "--listen", "--identity", key, "--server", server, "--stun", stunAddr)
	lis.Env = cleanEnv()
	var lisOut bytes.Buffer
	lisErr := &lockedBuffer{}
	lis.Stdin, lis.Stdout, lis.Stderr = bytes.NewReader(toClient), &lisOut, lisErr
	if err := lis.Start(); err != nil {
		t.Fatal(err)
	}
	lisDone := make(chan struct{})
	var lisWait error
	go func() {
		lisWait = lis.Wait()
		close(lisDone)
	}()
	t.Cleanup(func() {
		select {
		case <-lisDone:
		default:
			lis.Process.Kill()
			<-lisDone
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(lisErr.String(), "listening as "+node) {
		if time.Now().After(deadline) {
			t.Fatalf("listener never ready:\n%s", lisErr)
		}
		time.Sleep(20 * time.Millisecond)
	}

	cl := exec.Command(binary, "cat", "--identity", filepath.Join(t.TempDir(), "client.key"), "--server", server, "--stun", stunAddr, node)
	cl.Env = cleanEnv()
	var clOut, clErr bytes.Buffer
	cl.Stdin, cl.Stdout, cl.Stderr = bytes.NewReader(toListener), &clOut, &clErr
	if err := cl.Run(); err != nil {
		t.Fatalf("peerlink cat <node>: %v\n%s", err, &clErr)
	}
	select {
	case <-lisDone:
		if lisWait != nil {
			t.Fatalf("peerlink cat --listen: %v\n%s", lisWait, lisErr)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("listener did not finish\n%s", lisErr)
	}
	if sha256.Sum256(clOut.Bytes()) != sha256.Sum256(toClient) {
		t.Errorf("client received %d bytes, not the listener's %d-byte stdin", clOut.Len(), len(toClient))
	}
	if sha256.Sum256(lisOut.Bytes()) != sha256.Sum256(toListener) {
		t.Errorf("listener received %d bytes, not the client's %d-byte stdin", lisOut.Len(), len(toListener))
	}
	if !strings.Contains(clErr.String(), "connected to "+node) {
		t.Errorf("client's progress does not name the peer:\n%s", &clErr)
	}
}
