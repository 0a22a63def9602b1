package connect_test

import (
	"bufio"
	"context"
	"fmt"
	"log"
	"slices"
	"sync"
	"time"

	"peerlink/connect"
	"peerlink/connect/connecttest"
	"peerlink/identity"
	"peerlink/session"
)

// A chat between two peers behind home routers, in an emulated internet with a STUN
// server, a TURN relay and a rendezvous server. Alice connects to Bob by his NodeID:
// the connection works at once through the relay and moves to a hole-punched path; then
// an encrypted session carries the chat on a stream. Bob's side is the handler below.
func ExampleNode_Connect() {
	w, err := connecttest.Start(connecttest.Config{})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	alice, err := w.StartNode(ctx, connecttest.NodeConfig{Name: "alice", NAT: "port-restricted"})
	if err != nil {
		log.Fatal(err)
	}
	defer alice.Close()
	bob, err := w.StartNode(ctx, connecttest.NodeConfig{Name: "bob", NAT: "port-restricted"})
	if err != nil {
		log.Fatal(err)
	}
	defer bob.Close()
	bobDone := make(chan struct{})
	go func() {
		defer close(bobDone)
		chatHandler(ctx, bob.Node, bob.Identity)
	}()

	conn, err := alice.Connect(ctx, bob.NodeID(), connect.Options{})
	if err != nil {
		log.Fatal(err)
	}
	// Relay first: the punched path takes over when it works.
	for conn.Method() == connect.MethodRelayed && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Printf("alice reached bob: %s (%s)\n", conn.Method(), conn.Technique())
	s, err := session.New(ctx, conn, session.Config{Identity: alice.Identity})
	if err != nil {
		log.Fatal(err) // session.ErrPeerMismatch: not who signaling said
	}
	defer s.Close()
	st, err := s.OpenStream(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintln(st, "hello bob")
	reply, err := bufio.NewReader(st).ReadString('\n')
	if err != nil {
		log.Fatal(err)
	}
	fmt.Print("alice got: ", reply)
	st.Close()
	<-bobDone
	// Output:
	// alice reached bob: punched (prp-prp)
	// bob got: hello bob
	// alice got: hi alice
}

// chatHandler accepts one connection and one stream on it, and answers the first line.
func chatHandler(ctx context.Context, n *connect.Node, id *identity.Identity) {
	conn, err := n.Accept(ctx)
	if err != nil {
		return
	}
	s, err := session.New(ctx, conn, session.Config{Identity: id})
	if err != nil {
		return
	}
	defer s.Close()
	st, err := s.AcceptStream(ctx)
	if err != nil {
		return
	}
	r := bufio.NewReader(st)
	line, err := r.ReadString('\n')
	if err != nil {
		return
	}
	fmt.Print("bob got: ", line)
	fmt.Fprintln(st, "hi alice")
	st.Close()
	r.ReadString('\n') // until alice closes: closing the session earlier could lose the answer
}

// A connection manager keeps a connection open to each of its peers, and connects
// again when one ends: here Carol hangs up, and the hub is back with her at once.
func Example_connectionManager() {
	w, err := connecttest.Start(connecttest.Config{})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var nodes []*connecttest.Node
	for _, nat := range []string{"port-restricted", "full-cone", "symmetric"} {
		n, err := w.StartNode(ctx, connecttest.NodeConfig{NAT: nat})
		if err != nil {
			log.Fatal(err)
		}
		defer n.Close()
		nodes = append(nodes, n)
	}
	hub, bob, carol := nodes[0], nodes[1], nodes[2]

	m := newManager(hub.Node)
	defer m.close()
	m.keep("bob", bob.NodeID())
	m.keep("carol", carol.NodeID())
	if _, err := bob.Accept(ctx); err != nil {
		log.Fatal(err)
	}
	carolConn, err := carol.Accept(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(slices.Sorted(slices.Values([]string{<-m.events, <-m.events})))

	carolConn.Close() // says bye: the hub's connection ends at once
	if _, err := carol.Accept(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println(<-m.events)
	fmt.Println(<-m.events)
	// Output:
	// [bob: connection 1 up carol: connection 1 up]
	// carol: connection 1 ended
	// carol: connection 2 up
}

// manager keeps one connection open to each peer it is given.
type manager struct {
	node   *connect.Node
	events chan string
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newManager(n *connect.Node) *manager {
	m := &manager{node: n, events: make(chan string, 16)}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	return m
}

// keep connects to peer, and again each time the connection ends (the peer closed it
// or went away), until the manager closes.
func (m *manager) keep(name string, peer identity.NodeID) {
	m.wg.Go(func() {
		for i := 1; m.ctx.Err() == nil; i++ {
			c, err := m.node.Connect(m.ctx, peer, connect.Options{MaxAttempts: 3})
			if err != nil {
				select { // offline, say: try again a little later
				case <-m.ctx.Done():
				case <-time.After(time.Second):
				}
				continue
			}
			m.report("%s: connection %d up", name, i)
			// The application uses c; Recv stands in for it, returning when c ends.
			for err == nil {
				_, err = c.Recv(m.ctx)
			}
			c.Close()
			m.report("%s: connection %d ended", name, i)
		}
	})
}

func (m *manager) report(format string, args ...any) {
	select {
	case m.events <- fmt.Sprintf(format, args...):
	case <-m.ctx.Done():
	}
}

func (m *manager) close() {
	m.cancel()
	m.wg.Wait()
}
