package faultlab

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"net/url"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"peerlink/connect"
	"peerlink/netlab"
	"peerlink/signal"
	"peerlink/store/natsstore"
)

// natsCluster is a JetStream cluster of in-process NATS servers (on loopback, outside
// the lab: only the rendezvous servers, in this process, talk to it) whose nodes can be
// killed and started again with their ports and storage.
type natsCluster struct {
	t    *testing.T
	opts []*server.Options
	srvs []*server.Server
}

func startNATSCluster(t *testing.T, n int) *natsCluster {
	t.Helper()
	c := &natsCluster{t: t}
	var routes []*url.URL
	ports := make([][2]int, n)
	taken := map[int]bool{}
	for i := range ports {
		for j := range 2 {
			for ports[i][j] == 0 || taken[ports[i][j]] {
				ports[i][j] = freePort(t)
			}
			taken[ports[i][j]] = true
		}
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", ports[i][1])})
	}
	for i := range n {
		c.opts = append(c.opts, &server.Options{
			ServerName: fmt.Sprintf("n%d", i), Host: "127.0.0.1", Port: ports[i][0],
			JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
			Cluster: server.ClusterOpts{Name: "faultlab", Host: "127.0.0.1", Port: ports[i][1]},
			Routes:  routes,
		})
		c.srvs = append(c.srvs, nil)
		c.start(i)
	}
	t.Cleanup(func() {
		for i := range c.srvs {
			c.kill(i)
		}
	})
	c.waitHealthy(20 * time.Second)
	return c
}

// freePort picks a free loopback TCP port below the kernel's ephemeral range (32768
// and up): a node killed and started again must get its ports back, and a port from
// the ephemeral range may meanwhile be the source port of some outgoing connection
// (another node's route reconnecting), which makes the listen fail.
func freePort(t *testing.T) int {
	t.Helper()
	for range 100 {
		p := 20000 + rand.IntN(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err == nil {
			l.Close()
			return p
		}
	}
	t.Fatal("no free port below 32000")
	return 0
}

func (c *natsCluster) start(i int) {
	o := *c.opts[i]
	s, err := server.NewServer(&o)
	if err != nil {
		c.t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		c.t.Fatalf("NATS node %d did not start", i)
	}
	c.srvs[i] = s
}

func (c *natsCluster) kill(i int) {
	if s := c.srvs[i]; s != nil {
		s.Shutdown()
		s.WaitForShutdown()
		c.srvs[i] = nil
	}
}

// waitHealthy waits until every running node has routes to the others and JetStream
// has a meta leader that every node follows.
func (c *natsCluster) waitHealthy(within time.Duration) {
	c.t.Helper()
	running := 0
	for _, s := range c.srvs {
		if s != nil {
			running++
		}
	}
	for deadline := time.Now().Add(within); ; time.Sleep(50 * time.Millisecond) {
		ok, leader := true, false
		for _, s := range c.srvs {
			if s == nil {
				continue
			}
			ok = ok && s.NumRoutes() >= running-1 && s.JetStreamIsCurrent()
			leader = leader || s.JetStreamIsLeader()
		}
		if ok && leader {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("the NATS cluster is not healthy after %v", within)
		}
	}
}

func (c *natsCluster) url(order ...int) string {
	u := ""
	for k, i := range order {
		if k > 0 {
			u += ","
		}
		u += fmt.Sprintf("nats://127.0.0.1:%d", c.opts[i].Port)
	}
	return u
}

// TestNATSNodeLoss runs two rendezvous servers on a three-node NATS cluster, the first
// connected to node 0, the second to node 1, with a peer on each; a punched transfer
// runs between the peers while a NATS node dies: first node 2, which neither server
// uses, then (once it is back) node 0, under the first server. The transfer must go on
// intact without a stall of 2 s (unaffectedStall), and signaling between the peers
// must recover (the first server fails over to another node) within 10 s: a routing
// request caught in the dying node waits out the store's 5 s timeout.
func TestNATSNodeLoss(t *testing.T) {
	t.Parallel()
	w := startWorld(t, false,
		netlab.SiteConfig{Name: "pr-1", Kind: netlab.KindPortRestricted}, netlab.SiteConfig{Name: "pr-2", Kind: netlab.KindPortRestricted})
	cl := startNATSCluster(t, 3)
	rvs := make([]*rendezvous, 2)
	for i, order := range [][]int{{0, 1, 2}, {1, 2, 0}} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		// As peerlink rendezvous --nats --nats-replicas 3 makes it, with the client's
		// default reconnect timing; only the order is kept, to know which node each uses.
		st, err := natsstore.New(ctx, natsstore.Config{URL: cl.url(order...), Replicas: 3, Options: []natsOption{noRandomize()}})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() }) // registered before the server's: runs after it
		rvs[i] = startRendezvous(t, w.l.Server, netip.AddrPortFrom(w.l.Server.IPs[1], uint16(8443+i)), signal.Config{Store: st})
	}
	nodes := map[string]*node{}
	for i, name := range []string{"pr-1", "pr-2"} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		id := newIdentity(t)
		nn, err := startNode(t, ctx, w.l.Site(name).Host(), id, rvs[i].URL(), w.stun, nil)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		nodes[name] = nn
	}
	a, b := nodes["pr-1"], nodes["pr-2"]
	// Interest in b's subject takes a moment to spread through the cluster.
	if d := signalRecovery(a, b, time.Now(), 10*time.Second); d < 0 {
		t.Fatal("the peers cannot signal across the two servers")
	}

	// What a new connection takes with the cluster whole, to compare.
	cstart := time.Now()
	ca, cb, err := connectPair(context.Background(), a, b, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ca.Close()
	cb.Close()
	rows := []Row{{Fault: "none (baseline)", Survived: "new Connect: yes", Recovery: 0, Note: "took " + time.Since(cstart).Round(time.Millisecond).String()}}
	for _, tt := range []struct {
		name string
		kill int
	}{{"NATS node unused by both servers", 2}, {"NATS node under server 1", 0}} {
		sa, sb := pair(t, a, b, connect.MethodPunched)
		f := startFlow("punched", sa, sb, 5<<20, 1<<20, 5)
		time.Sleep(time.Second)
		killed := time.Now()
		cl.kill(tt.kill)
		rec := signalRecovery(a, b, killed, 15*time.Second)
		// A whole connection needs the offer, answer and punch messages both ways.
		cstart := time.Now()
		ca, cb, cerr := connectPair(context.Background(), a, b, 10*time.Second)
		if cerr == nil {
			ca.Close()
			cb.Close()
		}
		err := f.wait(30 * time.Second)
		gap := f.meter.MaxGap()
		rows = append(rows,
			Row{Fault: "kill " + tt.name, Survived: survived("punched transfer", err == nil && gap.Len() < unaffectedStall), Note: "longest stall " + gap.Len().Round(time.Millisecond).String()},
			Row{Fault: "kill " + tt.name, Survived: survived("signaling a ↔ b", rec >= 0), Recovery: rec, Note: "first routed message after the kill"},
			Row{Fault: "kill " + tt.name, Survived: survived("new Connect", cerr == nil), Recovery: orNever(cerr == nil, time.Since(killed)), Note: "took " + time.Since(cstart).Round(time.Millisecond).String()})
		if err != nil {
			t.Errorf("%s: transfer: %v", tt.name, err)
		}
		if gap.Len() >= unaffectedStall {
			t.Errorf("%s: the transfer stalled %v, want < %v", tt.name, gap.Len(), unaffectedStall)
		}
		// A routing request caught in the dying node waits out the store's 5 s timeout.
		if rec < 0 || rec > 10*time.Second {
			t.Errorf("%s: signaling recovered after %v, want within 10 s", tt.name, rec)
		}
		if cerr != nil {
			t.Errorf("%s: a new connection: %v", tt.name, cerr)
		}
		sa.Close()
		sb.Close()
		cl.start(tt.kill)
		cl.waitHealthy(20 * time.Second)
	}
	t.Logf("\n%s", Table(rows))
}
