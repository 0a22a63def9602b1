package partynet

import (
	"errors"
	"net"
	"sync"
	"testing"

	"golang.zx2c4.com/wireguard/conn"

	"peerlink/identity"
)

type recordSender struct {
	mu   sync.Mutex
	sent [][]byte
}

func (r *recordSender) SendBatch(bufs [][]byte) error {
	for _, b := range bufs {
		r.Send(b)
	}
	return nil
}

func (r *recordSender) Send(b []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sent = append(r.sent, append([]byte(nil), b...))
	return nil
}

func TestBind(t *testing.T) {
	b := newBind()
	var probes [][]byte
	b.probe = func(_ identity.NodeID, p []byte) { probes = append(probes, p) }
	id := identity.NodeID{1, 2, 3}
	ep, err := b.ParseEndpoint(id.String())
	if err != nil {
		t.Fatal(err)
	}
	if ep.DstToString() != id.String() || !ep.DstIP().IsValid() {
		t.Fatalf("endpoint %q, %v", ep.DstToString(), ep.DstIP())
	}
	if err := b.Send([][]byte{{1, 0, 0, 0}}, ep); !errors.Is(err, ErrNoConn) {
		t.Fatalf("send without a connection: %v", err)
	}
	s := &recordSender{}
	b.attach(id, s)
	if err := b.Send([][]byte{{1, 0, 0, 0}, {4, 0, 0, 0, 9}}, ep); err != nil || len(s.sent) != 2 {
		t.Fatalf("send: %v, %d sent", err, len(s.sent))
	}

	fns, _, err := b.Open(0)
	if err != nil || len(fns) != 1 {
		t.Fatalf("open: %v", err)
	}
	if _, _, err := b.Open(0); !errors.Is(err, conn.ErrBindAlreadyOpen) {
		t.Fatalf("second open: %v", err)
	}
	b.deliver(id, []byte{4, 0, 0, 0, 1})
	b.deliver(id, []byte{probePing, 1, 2, 3, 4, 5, 6, 7, 8})
	b.deliver(id, []byte{4, 0, 0, 0, 2})
	b.deliver(id, nil)
	packets := [][]byte{make([]byte, 64), make([]byte, 64), make([]byte, 64)}
	sizes := make([]int, 3)
	eps := make([]conn.Endpoint, 3)
	n, err := fns[0](packets, sizes, eps)
	if err != nil || n != 2 || packets[1][4] != 2 || sizes[0] != 5 || eps[0] != ep {
		t.Fatalf("receive: n=%d err=%v sizes=%v", n, err, sizes)
	}
	if len(probes) != 1 {
		t.Fatalf("%d probes reached the prober, want 1", len(probes))
	}

	done := make(chan error)
	go func() {
		_, err := fns[0](packets, sizes, eps)
		done <- err
	}()
	b.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("receive after Close: %v", err)
	}
	b.Close() // idempotent
	if _, _, err := b.Open(0); err != nil {
		t.Fatalf("reopen: %v", err)
	}
	b.Close()

	b.detach(id, &recordSender{}) // another sender: no effect
	if b.sender(id) != s {
		t.Fatal("detach of a replaced sender removed the current one")
	}
	b.detach(id, s)
	if b.sender(id) != nil {
		t.Fatal("sender still attached")
	}
}
