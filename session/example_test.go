package session_test

import (
	"context"
	"io"
	"os"

	"peerlink/connect"
	"peerlink/identity"
	"peerlink/session"
)

// A node that connected to a peer runs a session on the connection, opens a stream and
// sends a file; the peer runs New on the connection it accepted and calls AcceptStream.
func Example() {
	var (
		node *connect.Node      // started with connect.Start
		id   *identity.Identity // the node's identity
		peer identity.NodeID    // whom to reach
		ctx  = context.Background()
	)
	conn, err := node.Connect(ctx, peer, connect.Options{})
	if err != nil {
		return
	}
	s, err := session.New(ctx, conn, session.Config{Identity: id})
	if err != nil {
		return // session.ErrPeerMismatch: the peer is not who signaling said
	}
	defer s.Close()
	st, err := s.OpenStream(ctx)
	if err != nil {
		return
	}
	f, _ := os.Open("data.bin")
	io.Copy(st, f)
	st.Close()    // the peer reads io.EOF after the data
	_ = s.Stats() // RTT, jitter, loss, quality; s.Method() says relayed or direct
}
