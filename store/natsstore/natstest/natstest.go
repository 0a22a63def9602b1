// Package natstest runs real NATS servers, with JetStream, inside a test process: one
// server or a cluster whose nodes can be killed.
package natstest

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Start runs one NATS server with JetStream on a random loopback port. It is shut down
// when the test ends.
func Start(t testing.TB) *server.Server {
	t.Helper()
	s := run(t, &server.Options{
		ServerName: "single",
		Host:       "127.0.0.1",
		Port:       -1,
		JetStream:  true,
		StoreDir:   t.TempDir(),
		NoLog:      true,
		NoSigs:     true,
	})
	return s
}

func run(t testing.TB, o *server.Options) *server.Server {
	t.Helper()
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatalf("natstest: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatalf("natstest: server %s did not start", o.ServerName)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// Cluster is a JetStream cluster of in-process servers.
type Cluster struct {
	Servers []*server.Server
}

// StartCluster runs n clustered servers, routes between all of them, and waits until
// JetStream has a meta leader.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	// Route URLs must be known before the servers start, so reserve ports first.
	ports := make([]int, n)
	var routes []*url.URL
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", ports[i])})
	}
	c := &Cluster{}
	for i := range n {
		name := fmt.Sprintf("n%d", i+1)
		c.Servers = append(c.Servers, run(t, &server.Options{
			ServerName: name,
			Host:       "127.0.0.1",
			Port:       -1,
			JetStream:  true,
			StoreDir:   t.TempDir(),
			NoLog:      true,
			NoSigs:     true,
			Cluster:    server.ClusterOpts{Name: "peerlink-test", Host: "127.0.0.1", Port: ports[i]},
			Routes:     routes,
		}))
	}
	deadline := time.Now().Add(20 * time.Second)
	for !c.hasLeader() {
		if time.Now().After(deadline) {
			t.Fatal("natstest: JetStream cluster elected no meta leader")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c
}

func (c *Cluster) hasLeader() bool {
	for _, s := range c.Servers {
		if s.Running() && s.JetStreamIsLeader() {
			return true
		}
	}
	return false
}

// URL returns the client URLs of the running servers, comma separated.
func (c *Cluster) URL() string {
	var u []string
	for _, s := range c.Servers {
		if s.Running() {
			u = append(u, s.ClientURL())
		}
	}
	return strings.Join(u, ",")
}

// Kill shuts server i down, as abruptly as an in-process server allows.
func (c *Cluster) Kill(i int) {
	c.Servers[i].Shutdown()
	c.Servers[i].WaitForShutdown()
}
