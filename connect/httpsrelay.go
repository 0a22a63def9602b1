package connect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"peerlink/signal"
)

// Some networks let nothing out but HTTPS, often only through an HTTP proxy: no UDP,
// so no punching and no TURN over UDP, and TURN over TCP or TLS does not pass a proxy.
// The rendezvous connection does (it is a WebSocket the client may dial through a
// proxy), and the server relays datagrams between two nodes over it: the last rung of
// the ladder. The initiator opens it, tagged with the session, when neither a direct
// path nor a TURN relay came up; the responder takes it (acceptRelays) and uses it for
// that connection. Frames on it are the connection's own, so the server sees only what
// the peers already encrypt end to end.

// httpsGrace is how long a TURN relay that was tried gets to answer before the
// rendezvous server's relay is opened as well.
const httpsGrace = 3 * time.Second

// httpsFallback opens the rendezvous server's relay if the TURN relay has not carried
// anything within httpsGrace and no direct path came up.
func (c *Conn) httpsFallback() {
	t := time.NewTimer(httpsGrace)
	defer t.Stop()
	select {
	case <-t.C:
	case <-c.done:
		return
	case <-c.n.ctx.Done():
		return
	}
	c.mu.Lock()
	up := c.relayUp || (c.direct != nil && !c.directDown)
	c.mu.Unlock()
	if up {
		return
	}
	ctx, cancel := context.WithTimeout(c.n.ctx, c.opts.timeout())
	defer cancel()
	if err := c.httpsRelay(ctx); err != nil {
		c.n.log.Debug("connect: no relay through the rendezvous server either", "peer", c.peer.Short(), "err", err)
	}
}

// httpsRelay gives the connection the rendezvous server's relay: the initiator opens
// it, the responder waits for it.
func (c *Conn) httpsRelay(ctx context.Context) error {
	sc := c.n.signal()
	if sc == nil {
		return errors.New("connect: no rendezvous server to relay through")
	}
	if !c.initiator {
		select {
		case <-c.wsrReady:
			return nil
		case <-c.done:
			return c.err
		case <-ctx.Done():
			return fmt.Errorf("%w: the peer opened no relay through the rendezvous server", ctx.Err())
		}
	}
	rc, err := sc.OpenRelayTag(ctx, c.peer, c.session)
	if err != nil {
		// The peer waits for this relay: tell it there will be none.
		bctx, cancel := context.WithTimeout(c.n.ctx, time.Second)
		sc.Send(bctx, &signal.Message{Type: signal.TypeBye, To: c.peer, Session: c.session, Bye: &signal.Bye{Reason: "no path"}})
		cancel()
		return fmt.Errorf("connect: relaying through the rendezvous server: %w", err)
	}
	c.attachHTTPS(rc)
	return nil
}

// acceptRelays takes the relay sessions peers open through sc and gives each to its
// connection, until the node closes or sc ends.
func (n *Node) acceptRelays(sc *signal.Client) {
	for {
		rc, err := sc.AcceptRelay(n.ctx)
		if err != nil {
			return
		}
		n.mu.Lock()
		c := n.sessions[rc.Tag()]
		n.mu.Unlock()
		if c == nil || c.initiator || c.peer != rc.Peer() {
			n.log.Debug("connect: refused a relay session for no connection of ours", "peer", rc.Peer().Short())
			rc.Close()
			continue
		}
		c.attachHTTPS(rc)
	}
}

// attachHTTPS makes rc the connection's path through the rendezvous server.
func (c *Conn) attachHTTPS(rc *signal.RelayConn) {
	c.mu.Lock()
	if c.wsr != nil {
		c.mu.Unlock()
		rc.Close()
		return
	}
	c.wsr = rc
	c.mu.Unlock()
	select {
	case <-c.done: // closed meanwhile: closeWith may have missed it
		rc.Close()
		return
	default:
	}
	c.n.log.Info("connect: relaying through the rendezvous server", "peer", c.peer.Short())
	c.n.wg.Go(func() { c.readHTTPS(rc) })
	c.wsrOnce.Do(func() { close(c.wsrReady) })
	c.pathUp(MethodRelayedHTTPS)
}

// readHTTPS hands what comes through the rendezvous server's relay to the connection.
func (c *Conn) readHTTPS(rc *signal.RelayConn) {
	buf := make([]byte, 64<<10)
	for {
		k, _, err := rc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || c.n.ctx.Err() != nil {
				c.mu.Lock()
				if c.wsr == rc {
					c.wsr = nil
				}
				c.mu.Unlock()
				return
			}
			continue
		}
		id, kind, payload, ok := parseFrame(buf[:k])
		if !ok || id != c.recvID {
			continue
		}
		switch kind {
		case kindData:
			c.deliverData(payload)
		case kindPing:
			rc.WriteTo(appendFrame(nil, c.sendID, kindPong, nil), nil)
		}
	}
}

// deliverData queues a datagram for Recv.
func (c *Conn) deliverData(payload []byte) {
	b := make([]byte, len(payload)) // make and copy: no zeroing first
	copy(b, payload)
	c.received.Add(1)
	select {
	case c.in <- b:
	default: // a reader that does not keep up loses datagrams, as with UDP
		c.dropped.Add(1)
	}
}
