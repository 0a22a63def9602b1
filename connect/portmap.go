package connect

import (
	"context"
	"net"
	"net/netip"
	"time"

	"peerlink/portmap"
)

// Behind a NAT that cannot be punched (random ports, say), a port mapping from the
// gateway makes the node reachable all the same: the node asks for one for its main
// socket and publishes the mapped address as its public one, with the profile marked
// PortMapped, so that peers dial it directly rather than going through a relay.

// dialFunc adapts Config.DialContext to portmap.Dialer.
type dialFunc func(ctx context.Context, network, address string) (net.Conn, error)

func (f dialFunc) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return f(ctx, network, address)
}

// startPortMap asks the gateway for a mapping in the background: a gateway that speaks
// none of the protocols takes seconds to say so, and the node must not wait for that.
func (n *Node) startPortMap() {
	pm := *n.cfg.PortMap
	if pm.Net == nil {
		pm.Net = n.net
	}
	if pm.Dialer == nil && n.cfg.DialContext != nil {
		pm.Dialer = dialFunc(n.cfg.DialContext)
	}
	if pm.Logger == nil {
		pm.Logger = n.cfg.Logger
	}
	n.wg.Go(func() {
		m, err := portmap.Map(n.ctx, pm, n.main.LocalAddr().Port())
		if err != nil {
			n.log.Info("connect: no port mapping from the gateway", "err", err)
			return
		}
		ext := m.External()
		n.addrMu.Lock()
		n.mapping = m
		n.srflx = ext
		n.profile.PublicIP, n.profile.PublicPort, n.profile.PortMapped = ext.Addr(), ext.Port(), true
		n.addrMu.Unlock()
		n.log.Info("connect: port mapped", "protocol", m.Protocol(), "external", ext, "gateway", m.Gateway())
		select {
		case <-n.published:
		case <-n.ctx.Done():
			return
		}
		if sc := n.signal(); sc != nil {
			ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
			defer cancel()
			if err := sc.Publish(ctx, n.info()); err != nil {
				n.log.Debug("connect: publishing the mapped address", "err", err)
			}
		}
	})
}

// PortMapping is the gateway's port mapping for the node's main socket, or nil.
func (n *Node) PortMapping() *portmap.Mapping {
	n.addrMu.Lock()
	defer n.addrMu.Unlock()
	return n.mapping
}

// mappedAddr reports the mapped address while the mapping lives; a mapping whose
// renewal failed is dropped, and the node's public address goes back to what STUN
// sees (ok false).
func (n *Node) mappedAddr() (ext netip.AddrPort, ok bool) {
	n.addrMu.Lock()
	m := n.mapping
	if m == nil {
		n.addrMu.Unlock()
		return netip.AddrPort{}, false
	}
	if err := m.Err(); err != nil {
		n.mapping = nil
		n.profile.PortMapped = false
		n.addrMu.Unlock()
		n.log.Info("connect: port mapping lost", "err", err)
		m.Close()
		return netip.AddrPort{}, false
	}
	n.addrMu.Unlock()
	return m.External(), true
}
