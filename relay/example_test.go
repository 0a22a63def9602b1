//go:build linux

package relay_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"strings"
	"time"

	"peerlink/relay"
)

// Running a relay: a TURN server that takes short-lived credentials made from a secret
// it shares with the rendezvous server (which hands them to nodes), with a cap on
// sessions and bandwidth, and hooks that see sessions start and end. A client then
// allocates a relayed address and talks to a peer through it.
func ExampleServer() {
	const secret = "shared with the rendezvous server"
	sessions := make(chan relay.SessionInfo, 2)
	srv, err := relay.New(relay.Config{
		ListenUDP:      "127.0.0.1:0",
		Secret:         secret,
		MaxSessions:    500,
		BandwidthLimit: 5 << 20, // bytes per second and session
		OnSessionStart: func(s relay.SessionInfo) { sessions <- s },
		OnSessionEnd:   func(s relay.SessionInfo) { sessions <- s },
		// The peer below is on loopback; a relay on the internet refuses such peers.
		AllowLoopbackPeers: true,
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	server := srv.Addrs()[relay.UDP][0].String()

	// What the rendezvous server would give the node "alice" for the next hour.
	user, pass := relay.RESTCredentials(secret, "alice", time.Now().Add(time.Hour))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := relay.Dial(ctx, relay.ClientConfig{Server: server, Username: user, Password: pass})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	peer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer peer.Close()
	peer.SetDeadline(time.Now().Add(5 * time.Second))
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	c.WriteTo([]byte("hello from alice"), peer.LocalAddr())
	n, from, err := peer.ReadFrom(buf)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("peer got %q from alice's relayed address: %v\n", buf[:n], from.String() == c.RelayedAddr().String())
	peer.WriteTo([]byte("hello alice"), from)
	if n, _, err = c.ReadFrom(buf); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("alice got %q\n", buf[:n])

	s := <-sessions
	fmt.Println("session started for", strings.SplitN(s.User, ":", 2)[1])
	c.Close()
	s = <-sessions
	fmt.Printf("session ended (%s): %d bytes in, %d bytes out\n", s.Reason, s.BytesIn, s.BytesOut)
	// Output:
	// peer got "hello from alice" from alice's relayed address: true
	// alice got "hello alice"
	// session started for alice
	// session ended (deleted): 16 bytes in, 11 bytes out
}
