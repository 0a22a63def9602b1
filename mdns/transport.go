package mdns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// iface is an interface the transport uses, with the addresses it had at start.
type iface struct {
	Index int
	Name  string
	V4    []netip.Addr
	V6    []netip.Addr
	// joined4 and joined6 say whether the group was joined on this interface.
	joined4, joined6 bool
}

// addrs returns the interface's addresses, IPv4 first, link-local IPv6 with its zone.
func (i *iface) addrs() []netip.Addr {
	out := slices.Clone(i.V4)
	for _, a := range i.V6 {
		if a.IsLinkLocalUnicast() {
			a = a.WithZone(i.Name)
		}
		out = append(out, a)
	}
	return out
}

// handler receives every parsed packet; it is called from the transport's read
// goroutines, one per family, so it must be safe for concurrent use.
type handler func(pk *packet, src netip.AddrPort, ifc *iface)

// transport is the pair of multicast sockets an Advertiser or Browser owns.
type transport struct {
	cfg    *Config
	log    *slog.Logger
	ifaces map[int]*iface
	order  []*iface
	c4     net.PacketConn
	p4     *ipv4.PacketConn
	c6     net.PacketConn
	p6     *ipv6.PacketConn
	handle handler

	wg        sync.WaitGroup
	closeOnce sync.Once
}

// listenConfig shares port 5353 with other responders on the host (Avahi, another
// peerlink process, or an Advertiser and Browser in one process): every socket bound to
// the port gets its own copy of each multicast packet.
var listenConfig = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
			return
		}
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}}

// pickInterfaces applies Config.Interfaces to the host's interfaces.
func pickInterfaces(cfg *Config) ([]*iface, error) {
	all, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("mdns: listing interfaces: %w", err)
	}
	var out []*iface
	for _, ni := range all {
		named := slices.Contains(cfg.Interfaces, ni.Name)
		if len(cfg.Interfaces) > 0 && !named {
			continue
		}
		if ni.Flags&net.FlagUp == 0 || ni.Flags&net.FlagMulticast == 0 {
			continue
		}
		if !named && ni.Flags&net.FlagLoopback != 0 {
			continue
		}
		ifc := &iface{Index: ni.Index, Name: ni.Name}
		addrs, err := ni.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			switch {
			case ip.Is4() && !cfg.DisableIPv4:
				ifc.V4 = append(ifc.V4, ip)
			case ip.Is6() && !cfg.DisableIPv6:
				ifc.V6 = append(ifc.V6, ip)
			}
		}
		if len(ifc.V4)+len(ifc.V6) > 0 {
			out = append(out, ifc)
		}
	}
	for _, name := range cfg.Interfaces {
		if !slices.ContainsFunc(out, func(i *iface) bool { return i.Name == name }) {
			return nil, fmt.Errorf("%w: %q is missing, down, not multicast-capable or has no address", ErrNoInterfaces, name)
		}
	}
	if len(out) == 0 {
		return nil, ErrNoInterfaces
	}
	return out, nil
}

// openTransport opens and joins the sockets in the calling goroutine (so a caller that
// runs it inside a network namespace gets sockets there) and starts reading.
func openTransport(ctx context.Context, cfg *Config, h handler) (_ *transport, err error) {
	ifs, err := pickInterfaces(cfg)
	if err != nil {
		return nil, err
	}
	t := &transport{cfg: cfg, log: cfg.log(), ifaces: map[int]*iface{}, order: ifs, handle: h}
	defer func() {
		if err != nil {
			t.close()
		}
	}()
	for _, i := range ifs {
		t.ifaces[i.Index] = i
	}
	var errs []error
	if slices.ContainsFunc(ifs, func(i *iface) bool { return len(i.V4) > 0 }) {
		if err := t.open4(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if slices.ContainsFunc(ifs, func(i *iface) bool { return len(i.V6) > 0 }) {
		if err := t.open6(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if !slices.ContainsFunc(ifs, func(i *iface) bool { return i.joined4 || i.joined6 }) {
		return nil, fmt.Errorf("%w: %w", ErrNoInterfaces, errors.Join(errs...))
	}
	for _, err := range errs {
		t.log.Warn("mdns: one address family is unavailable", "err", err)
	}
	if t.p4 != nil {
		t.wg.Add(1)
		go t.read4()
	}
	if t.p6 != nil {
		t.wg.Add(1)
		go t.read6()
	}
	return t, nil
}

func (t *transport) open4(ctx context.Context) error {
	c, err := listenConfig.ListenPacket(ctx, "udp4", "0.0.0.0:5353")
	if err != nil {
		return fmt.Errorf("mdns: listen udp4 :5353: %w", err)
	}
	t.c4, t.p4 = c, ipv4.NewPacketConn(c)
	// RFC 6762 §11: everything is sent with IP TTL 255. Loopback lets a Browser see an
	// Advertiser in the same network namespace.
	if err := errors.Join(
		t.p4.SetControlMessage(ipv4.FlagInterface|ipv4.FlagDst, true),
		t.p4.SetMulticastTTL(255),
		t.p4.SetTTL(255),
		t.p4.SetMulticastLoopback(true),
	); err != nil {
		return fmt.Errorf("mdns: udp4 socket options: %w", err)
	}
	group := &net.UDPAddr{IP: GroupV4.Addr().AsSlice()}
	for _, i := range t.order {
		if len(i.V4) == 0 {
			continue
		}
		if err := t.p4.JoinGroup(&net.Interface{Index: i.Index, Name: i.Name}, group); err != nil {
			t.log.Warn("mdns: cannot join IPv4 group", "interface", i.Name, "err", err)
			continue
		}
		i.joined4 = true
	}
	return nil
}

func (t *transport) open6(ctx context.Context) error {
	c, err := listenConfig.ListenPacket(ctx, "udp6", "[::]:5353")
	if err != nil {
		return fmt.Errorf("mdns: listen udp6 :5353: %w", err)
	}
	t.c6, t.p6 = c, ipv6.NewPacketConn(c)
	if err := errors.Join(
		t.p6.SetControlMessage(ipv6.FlagInterface|ipv6.FlagDst, true),
		t.p6.SetMulticastHopLimit(255),
		t.p6.SetHopLimit(255),
		t.p6.SetMulticastLoopback(true),
	); err != nil {
		return fmt.Errorf("mdns: udp6 socket options: %w", err)
	}
	group := &net.UDPAddr{IP: GroupV6.Addr().AsSlice()}
	for _, i := range t.order {
		if len(i.V6) == 0 {
			continue
		}
		if err := t.p6.JoinGroup(&net.Interface{Index: i.Index, Name: i.Name}, group); err != nil {
			t.log.Warn("mdns: cannot join IPv6 group", "interface", i.Name, "err", err)
			continue
		}
		i.joined6 = true
	}
	return nil
}

func (t *transport) read4() {
	defer t.wg.Done()
	buf := make([]byte, maxPacket+1)
	for {
		n, cm, src, err := t.p4.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				t.log.Warn("mdns: udp4 read", "err", err)
			}
			return
		}
		if cm == nil {
			continue
		}
		t.deliver(buf[:n], src, cm.IfIndex)
	}
}

func (t *transport) read6() {
	defer t.wg.Done()
	buf := make([]byte, maxPacket+1)
	for {
		n, cm, src, err := t.p6.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				t.log.Warn("mdns: udp6 read", "err", err)
			}
			return
		}
		if cm == nil {
			continue
		}
		t.deliver(buf[:n], src, cm.IfIndex)
	}
}

func (t *transport) deliver(b []byte, src net.Addr, ifIndex int) {
	ua, ok := src.(*net.UDPAddr)
	if !ok {
		return
	}
	ap := ua.AddrPort()
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if t.cfg.tap != nil {
		t.cfg.tap(b, ap, ifIndex)
	}
	// A socket bound to the wildcard address also gets groups joined by other sockets
	// on other interfaces; only the chosen interfaces count.
	ifc, ok := t.ifaces[ifIndex]
	if !ok {
		return
	}
	pk, err := parsePacket(b)
	if err != nil {
		t.log.Debug("mdns: dropping packet", "from", ap, "interface", ifc.Name, "err", err)
		return
	}
	t.handle(pk, ap, ifc)
}

// multicast sends b to the group of every family joined on ifc.
func (t *transport) multicast(b []byte, ifc *iface) error {
	var errs []error
	if ifc.joined4 {
		errs = append(errs, t.sendTo(b, ifc, GroupV4))
	}
	if ifc.joined6 {
		errs = append(errs, t.sendTo(b, ifc, GroupV6))
	}
	return errors.Join(errs...)
}

// sendTo sends b to dst out of ifc.
func (t *transport) sendTo(b []byte, ifc *iface, dst netip.AddrPort) error {
	if dst.Addr().Is4() {
		if t.p4 == nil {
			return fmt.Errorf("mdns: no IPv4 socket for %v", dst)
		}
		_, err := t.p4.WriteTo(b, &ipv4.ControlMessage{IfIndex: ifc.Index}, net.UDPAddrFromAddrPort(dst))
		return err
	}
	if t.p6 == nil {
		return fmt.Errorf("mdns: no IPv6 socket for %v", dst)
	}
	a := dst.Addr()
	if a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() {
		// A numeric zone: a name would be looked up in the network namespace of
		// whichever thread sends, which need not be the socket's.
		a = a.WithZone(strconv.Itoa(ifc.Index))
	}
	_, err := t.p6.WriteTo(b, &ipv6.ControlMessage{IfIndex: ifc.Index}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, dst.Port())))
	return err
}

// close closes the sockets and waits for the read goroutines.
func (t *transport) close() {
	t.closeOnce.Do(func() {
		if t.c4 != nil {
			t.c4.Close()
		}
		if t.c6 != nil {
			t.c6.Close()
		}
	})
	t.wg.Wait()
}
