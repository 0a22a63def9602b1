package netlab

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ErrDelayUnsupported is wrapped when a delayed link cannot be built.
var ErrDelayUnsupported = errors.New("netlab: link delay unsupported")

// This kernel has no netem, so a delayed link is a relay in this process. The site's
// interface and the internet router's are each paired with a veth end in a "dly"
// namespace that has no addresses and does not forward; a packet socket on each of those
// ends reads every frame and writes it to the other end once the delay has passed:
//
//	site ns: wan <-> dNa  [relay, dly ns]  dNb <-> sN: internet ns
//
// Frames cross as they are, ARP included, so the two ends see a plain Ethernet link. The
// sockets use virtio-net headers: offloaded frames (unfinished checksums, TCP segments
// larger than the MTU) keep their offload state across the relay instead of arriving
// corrupt or too large.

// delayQueue is how many frames may wait in each direction; more are dropped, as by a
// full router queue.
const delayQueue = 8192

// delayLink relays frames between two interfaces, each way after a fixed delay.
type delayLink struct {
	delay   time.Duration
	files   [2]*os.File
	done    chan struct{}
	wg      sync.WaitGroup
	once    sync.Once
	dropped atomic.Int64
	log     *slog.Logger
}

type frame struct {
	due  time.Time
	data []byte
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// packetSocket opens a non-blocking packet socket bound to one interface of the current
// namespace, with virtio-net headers and without its own transmissions looped back.
func packetSocket(ifname string) (*os.File, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, err
	}
	// Protocol 0 receives nothing until bind, so no frame of another interface slips in.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	for _, opt := range [][2]int{{unix.PACKET_VNET_HDR, 1}, {unix.PACKET_IGNORE_OUTGOING, 1}} {
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, opt[0], opt[1]); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("packet socket option %d: %w", opt[0], err)
		}
	}
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "packet:"+ifname), nil
}

// newDelayLink starts relaying between interfaces a and b of namespace ns.
func newDelayLink(ns, a, b string, delay time.Duration, log *slog.Logger) (*delayLink, error) {
	d := &delayLink{delay: delay, done: make(chan struct{}), log: log}
	err := inNetns(ns, func() error {
		for i, name := range []string{a, b} {
			f, err := packetSocket(name)
			if err != nil {
				return fmt.Errorf("%w: %s: %v", ErrDelayUnsupported, name, err)
			}
			d.files[i] = f
		}
		return nil
	})
	if err != nil {
		d.closeFiles()
		return nil, err
	}
	for i := range 2 {
		q := make(chan frame, delayQueue)
		from, to := d.files[i], d.files[1-i]
		d.wg.Go(func() { d.read(from, q) })
		d.wg.Go(func() { d.write(to, q) })
	}
	return d, nil
}

func (d *delayLink) read(f *os.File, q chan<- frame) {
	defer close(q)
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	buf := make([]byte, 1<<17) // a virtio-net header and the largest segmentation-offload frame
	for {
		var n int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_TRUNC)
			return rerr != unix.EAGAIN
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			select {
			case <-d.done: // closed by Close
			default:
				if d.log != nil {
					d.log.Warn("delay relay stopped", "iface", f.Name(), "err", err)
				}
			}
			return
		}
		if n > len(buf) {
			d.dropped.Add(1) // truncated: cannot forward it faithfully
			continue
		}
		fr := frame{due: time.Now().Add(d.delay), data: append([]byte(nil), buf[:n]...)}
		select {
		case q <- fr:
		default:
			d.dropped.Add(1)
		}
	}
}

func (d *delayLink) write(f *os.File, q <-chan frame) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for fr := range q {
		if wait := time.Until(fr.due); wait > 0 {
			t.Reset(wait)
			select {
			case <-t.C:
			case <-d.done:
				return
			}
		}
		var werr error
		err := rc.Write(func(fd uintptr) bool {
			_, werr = unix.Write(int(fd), fr.data)
			return werr != unix.EAGAIN
		})
		if err != nil {
			return // closed
		}
		if werr != nil {
			d.dropped.Add(1) // the kernel refused the frame (the peer went away, say)
		}
	}
}

func (d *delayLink) closeFiles() {
	for _, f := range d.files {
		if f != nil {
			f.Close()
		}
	}
}

// Close stops the relay and waits for its goroutines. It is safe to call more than once.
func (d *delayLink) Close() error {
	d.once.Do(func() {
		close(d.done)
		d.closeFiles()
		d.wg.Wait()
	})
	return nil
}

// delayedVeth joins interface ifname of namespace ns to the internet router's inetIf
// through a delay relay.
func (l *Lab) delayedVeth(ctx context.Context, ns, ifname, inetIf string, delay time.Duration) error {
	l.mu.Lock()
	idx := len(l.delays)
	l.mu.Unlock()
	if l.delayNS == nil {
		h, err := l.addNode(ctx, "delay relays", delayNode, nil, false)
		if err != nil {
			return err
		}
		l.delayNS = h
	}
	a, b := fmt.Sprintf("d%da", idx), fmt.Sprintf("d%db", idx)
	if err := veth(ctx, ns, ifname, l.delayNS.NS, a); err != nil {
		return err
	}
	if err := veth(ctx, l.delayNS.NS, b, l.Internet.NS, inetIf); err != nil {
		return err
	}
	if err := ipBatch(ctx, l.delayNS.NS, "link set "+a+" up", "link set "+b+" up"); err != nil {
		return err
	}
	d, err := newDelayLink(l.delayNS.NS, a, b, delay, l.log)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.delays = append(l.delays, d)
	l.mu.Unlock()
	return nil
}
