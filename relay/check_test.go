package relay_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"peerlink/relay"
	"peerlink/relay/relaytest"
)

// TestCheckFindsLostAllocation checks that a client learns its allocation is gone:
// when the relay restarts on the same port it no longer knows the allocation; when it
// stays down, checks go unanswered.
func TestCheckFindsLostAllocation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		restart bool
	}{{"restarted", true}, {"down", false}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := relaytest.Start(t, relay.Config{})
			ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
			defer cancel()
			c, err := relay.Dial(ctx, relay.ClientConfig{Server: r.UDP.String(), Username: relaytest.User, Password: relaytest.Password, KeepAlive: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.Check(ctx); err != nil {
				t.Fatalf("check of a fresh allocation: %v", err)
			}
			if c.Err() != nil {
				t.Fatalf("Err of a working allocation: %v", c.Err())
			}
			r.Close()
			if tc.restart {
				relaytest.Start(t, relay.Config{ListenUDP: r.UDP.String(), ListenTCP: "127.0.0.1:0"})
			}
			// A restarted relay answers at once, so one check knows; one that is down
			// takes a few unanswered ones.
			var last error
			tries := 0
			for range 4 {
				tries++
				if last = c.Check(ctx); last != nil {
					break
				}
			}
			if tc.restart && tries != 1 {
				t.Errorf("a restarted relay took %d checks to notice", tries)
			}
			if !errors.Is(last, relay.ErrAllocationLost) {
				t.Fatalf("checks after the relay went away: %v, want ErrAllocationLost", last)
			}
			select {
			case <-c.Lost():
			default:
				t.Fatal("Lost not closed")
			}
			if !errors.Is(c.Err(), relay.ErrAllocationLost) {
				t.Fatalf("Err: %v", c.Err())
			}
			t.Logf("%s: %v", tc.name, last)
		})
	}
}

// TestCheckKeepsWorkingAllocation checks that the periodic checks leave a working
// allocation alone and it still relays.
func TestCheckKeepsWorkingAllocation(t *testing.T) {
	r := relaytest.Start(t, relay.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := relay.Dial(ctx, relay.ClientConfig{Server: r.UDP.String(), Username: relaytest.User, Password: relaytest.Password, KeepAlive: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	time.Sleep(500 * time.Millisecond) // several checks
	if err := c.Err(); err != nil {
		t.Fatalf("a working allocation was found lost: %v", err)
	}
	if _, err := c.WriteTo([]byte("hello"), peer.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 64)
	n, from, err := peer.ReadFrom(b)
	if err != nil || string(b[:n]) != "hello" || from.String() != c.RelayedAddr().String() {
		t.Fatalf("relayed datagram: %q from %v (%v), want hello from %v", b[:n], from, err, c.RelayedAddr())
	}
}
