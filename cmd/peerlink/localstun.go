package main

import (
	"context"
	"fmt"
	"net/netip"

	"peerlink/stun"
)

// startLocalSTUN starts an RFC 5780 STUN server on 127.0.0.1 and 127.0.0.2 (Linux routes
// all of 127.0.0.0/8 to loopback) and returns its primary address and a stop function.
func startLocalSTUN(ctx context.Context) ([]string, func(), error) {
	s, err := stun.Listen(ctx, stun.Config{Listen: "127.0.0.1:0", AltIP: netip.MustParseAddr("127.0.0.2")})
	if err != nil {
		return nil, nil, fmt.Errorf("%w (the second loopback address 127.0.0.2 must be usable)", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	stop := func() {
		s.Close()
		<-done
	}
	return []string{s.UDPAddr(0).String()}, stop, nil
}
