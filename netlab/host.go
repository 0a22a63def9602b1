package netlab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns` keeps its named namespaces.
const netnsDir = "/var/run/netns"

// Host is one network namespace of a lab: an end host, a NAT router, the internet
// router or the server. Its methods open sockets inside the namespace from this
// process, so a Host can be handed to any peerlink component as its network
// (it implements nettype.PacketListener).
type Host struct {
	// Name is the lab-local name, such as "full-cone/h0" or "server".
	Name string
	// NS is the network namespace, as `ip netns` names it.
	NS string
	// IPs are the host's IPv4 addresses, the main one first.
	IPs []netip.Addr
	// IPv6 are the host's global IPv6 addresses in a lab built with Config.IPv6 (the
	// server's two, a router's WAN address, an end host's); empty otherwise.
	IPv6 []netip.Addr

	lab *Lab
}

// IP returns the host's main address.
func (h *Host) IP() netip.Addr {
	if len(h.IPs) == 0 {
		return netip.Addr{}
	}
	return h.IPs[0]
}

func (h *Host) String() string { return fmt.Sprintf("%s (netns %s, %v)", h.Name, h.NS, h.IPs) }

// ListenPacket opens a packet socket inside the host's namespace: "udp4", or in an IPv6
// lab also "udp6" and "udp". The lab closes it on Close if the caller has not.
func (h *Host) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	var c net.PacketConn
	err := h.Do(func() error {
		var err error
		c, err = (&net.ListenConfig{}).ListenPacket(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := h.lab.track(c); err != nil {
		return nil, err
	}
	return c, nil
}

// Listen opens a stream listener inside the host's namespace.
func (h *Host) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	var l net.Listener
	err := h.Do(func() error {
		var err error
		l, err = (&net.ListenConfig{}).Listen(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := h.lab.track(l); err != nil {
		return nil, err
	}
	return l, nil
}

// DialContext connects from inside the host's namespace ("tcp6" and "udp6" too in an
// IPv6 lab). address must be a literal IP:port ("[2001:db8::1]:443" for IPv6): name
// resolution would run outside the namespace.
func (h *Host) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if _, err := netip.ParseAddrPort(address); err != nil {
		return nil, fmt.Errorf("netlab: dial %q: want a literal ip:port: %w", address, err)
	}
	var c net.Conn
	err := h.Do(func() error {
		var err error
		// With one literal address the dialer creates and connects the socket in this
		// goroutine, so it is born in the namespace.
		c, err = (&net.Dialer{}).DialContext(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := h.lab.track(c); err != nil {
		return nil, err
	}
	return c, nil
}

// Command returns a command that runs name inside the host's namespace (through
// `ip netns exec`). The lab kills whatever still runs in its namespaces on Close.
func (h *Host) Command(ctx context.Context, name string, arg ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, arg...)...)
}

// Run runs a command inside the host's namespace and returns its combined output.
func (h *Host) Run(ctx context.Context, name string, arg ...string) ([]byte, error) {
	out, err := h.Command(ctx, name, arg...).CombinedOutput()
	if err != nil {
		return out, &CmdError{Args: append([]string{"ip", "netns", "exec", h.NS, name}, arg...), Output: string(out), Err: err}
	}
	return out, nil
}

// Do runs fn on an OS thread that has entered the host's namespace. Sockets created by fn
// stay in the namespace for their whole life. fn must not start goroutines that create
// sockets: they would run elsewhere. The lab does not know about such sockets: close them
// before Close, or they keep the namespace (and its veths and nft tables) alive after
// the lab has deleted its name.
func (h *Host) Do(fn func() error) error { return inNetns(h.NS, fn) }

// inNetns runs fn on a fresh locked thread switched into namespace ns. If the thread
// cannot be switched back it is left locked, so the runtime discards it.
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: open own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		target, err := unix.Open(filepath.Join(netnsDir, ns), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: open netns %s: %w", ns, err)
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: enter netns %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Stay locked: the thread dies with this goroutine.
			errc <- fmt.Errorf("netlab: leave netns %s: %w", ns, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// closers remembers what the lab's hosts opened, so Close can release the namespaces
// even when a caller leaked a socket: an open socket keeps its namespace, and with it
// the veths and nft tables, alive after `ip netns del`.
type closers struct {
	mu     sync.Mutex
	closed bool
	list   []io.Closer
}

func (l *Lab) track(c io.Closer) error {
	l.closers.mu.Lock()
	defer l.closers.mu.Unlock()
	if l.closers.closed {
		c.Close()
		return ErrClosed
	}
	l.closers.list = append(l.closers.list, c)
	return nil
}

func (l *Lab) closeTracked() {
	l.closers.mu.Lock()
	list := l.closers.list
	l.closers.list = nil
	l.closers.closed = true
	l.closers.mu.Unlock()
	for _, c := range list {
		c.Close()
	}
}
