package connect

import (
	"net"
	"time"
)

// PathCheck tunes how a connection watches its direct path. NATs drop mappings and
// links fail without a word, so a direct path that stops answering must give way to
// the relay before the application notices, and come back only once it has been seen
// to work again for a while.
//
// The zero value is the defaults.
type PathCheck struct {
	// Interval is how often the direct path is pinged; zero means 500 ms.
	Interval time.Duration
	// Timeout is how long the direct path may go without a pong before the connection
	// moves to the relay (when the relayed path is up); zero means 3 s.
	Timeout time.Duration
	// Retry is how often a connection that fell back to the relay tries the direct
	// path again; zero means 60 s.
	Retry time.Duration
	// Disabled turns the checks off: the direct path is used until the connection ends.
	Disabled bool
}

// restorePongs is how many pongs a retried direct path must answer within one Timeout
// before traffic goes back to it: a path that answers one ping in a burst of losses is
// not yet a path to move onto.
const restorePongs = 3

func (p PathCheck) interval() time.Duration {
	if p.Interval <= 0 {
		return 500 * time.Millisecond
	}
	return p.Interval
}

func (p PathCheck) timeout() time.Duration {
	if p.Timeout <= 0 {
		return 3 * time.Second
	}
	return p.Timeout
}

func (p PathCheck) retry() time.Duration {
	if p.Retry <= 0 {
		return 60 * time.Second
	}
	return p.Retry
}

// sleep waits d on the node's clock; false means the connection or the node ended.
func (c *Conn) sleep(d time.Duration) bool {
	tick := make(chan struct{})
	t := c.n.clock.AfterFunc(d, func() { close(tick) })
	select {
	case <-tick:
		return true
	case <-c.done:
	case <-c.n.ctx.Done():
	}
	t.Stop()
	return false
}

// directPong records a pong that came over the direct path.
func (c *Conn) directPong() {
	c.mu.Lock()
	c.lastPong = c.n.clock.Now()
	c.pongs++
	c.mu.Unlock()
}

// watchDirect pings the direct path and moves the connection between it and the relay:
// to the relay when pongs stop for Timeout, back to direct when a retry every Retry
// gets restorePongs pongs within one Timeout. Pongs, not any traffic, are what count:
// on a path cut in one direction only, one side still receives and must not be fooled.
func (c *Conn) watchDirect() {
	pc := c.n.cfg.PathCheck
	interval, timeout, retry := pc.interval(), pc.timeout(), pc.retry()
	ping := appendFrame(nil, c.sendID, kindPing, nil)
	c.mu.Lock()
	c.lastPong = c.n.clock.Now()
	c.mu.Unlock()
	var retryAt, probeUntil time.Time
	probeBase := 0
	for c.sleep(interval) {
		now := c.n.clock.Now()
		c.mu.Lock()
		direct, addr := c.direct, c.directAddr
		down, last, pongs, relayUp, https := c.directDown, c.lastPong, c.pongs, c.relayUp, c.wsr != nil
		c.mu.Unlock()
		if direct == nil {
			return
		}
		switch {
		case !down:
			direct.WriteTo(ping, addr)
			if now.Sub(last) < timeout {
				continue
			}
			if !relayUp && !https {
				// Nowhere to go: keep the direct path and hope it comes back.
				continue
			}
			c.mu.Lock()
			c.directDown = true
			c.method = MethodRelayed
			if !relayUp {
				c.method = MethodRelayedHTTPS
			}
			c.stats.Fallbacks++
			c.mu.Unlock()
			retryAt, probeUntil = now.Add(retry), time.Time{}
			c.n.log.Info("connect: direct path silent, moved to the relay", "peer", c.peer.Short(), "silent", now.Sub(last).Round(time.Millisecond), "retry_in", retry)
		case probeUntil.IsZero() && now.Before(retryAt) && !c.retrySoon.Swap(false):
			// Relayed, waiting for the next retry.
		case probeUntil.IsZero():
			probeUntil, probeBase = now.Add(timeout), pongs
			direct.WriteTo(ping, addr)
		case pongs-probeBase >= restorePongs:
			c.mu.Lock()
			c.directDown = false
			c.method = c.directMethod
			c.lastPong = now
			c.stats.Restores++
			c.mu.Unlock()
			c.n.log.Info("connect: direct path answers again, moved back to it", "peer", c.peer.Short(), "method", c.directMethod)
		case now.After(probeUntil):
			probeUntil, retryAt = time.Time{}, now.Add(retry)
			c.n.log.Debug("connect: direct path still silent", "peer", c.peer.Short(), "pongs", pongs-probeBase)
		default:
			direct.WriteTo(ping, addr)
		}
	}
}

// watchRelay pings the peer through the relay while the connection uses it, and asks
// the node to check its allocation when the relayed path goes silent for Timeout: a
// relay that restarted or a NAT that rebound the allocation's mapping shows first as
// silence. The node allocates again and the path comes back (Node.refresh).
func (c *Conn) watchRelay() {
	pc := c.n.cfg.PathCheck
	interval, timeout := pc.interval(), pc.timeout()
	ping := appendFrame(nil, c.sendID, kindPing, nil)
	var checked time.Time
	for c.sleep(interval) {
		now := c.n.clock.Now()
		c.mu.Lock()
		onRelay := c.direct == nil || c.directDown
		up, peer := c.relayUp, c.relayPeer
		c.mu.Unlock()
		if !onRelay || !up {
			continue // the direct path carries it, or relayPing is confirming the relay
		}
		if rc := c.n.relayConn(); rc != nil {
			rc.WriteTo(ping, net.UDPAddrFromAddrPort(peer))
		}
		heard := time.Unix(0, c.relayHeard.Load())
		if now.Sub(heard) >= timeout && now.Sub(checked) >= 2*timeout {
			checked = now
			c.n.log.Debug("connect: relayed path silent, checking the relay", "peer", c.peer.Short(), "silent", now.Sub(heard).Round(time.Millisecond))
			c.n.checkRelaySoon()
		}
	}
}
