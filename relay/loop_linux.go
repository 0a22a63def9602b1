package relay

import (
	"encoding/binary"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The event loop carries UDP clients end to end and every allocation's relayed socket.
// One goroutine per loop waits in epoll_wait on its own epoll set; on each wake it reads
// every ready socket with recvmmsg, relays what it read and sends everything bound for
// clients in one sendmmsg. That keeps the per-packet cost at the system calls: no
// goroutine switch, no allocation, no lock.

const (
	batchSize = 32 // datagrams per recvmmsg
	numSlots  = 2 * batchSize
	// headroom is left in front of each datagram read from a peer, for the ChannelData
	// or Data indication header the relay puts in front of it (at most
	// dataIndicationHeader bytes).
	headroom = 64
	// slotSize fits the largest UDP payload plus headroom and Data indication padding.
	slotSize = headroom + maxPayload + 4
	// sockBuf is the listener sockets' kernel buffer size; the kernel caps it at
	// net.core.rmem_max and wmem_max.
	sockBuf = 4 << 20
)

var _ [headroom - dataIndicationHeader]struct{} // headroom must fit the header

// udpListener is a client-facing UDP socket and the allocations of the clients it
// carries, keyed by client address: the 5-tuple.
type udpListener struct {
	fd     int
	v6     bool
	allocs map[addrKey]*allocation // owned by the loop
}

// counters are a loop's share of the relay's statistics.
type counters struct {
	bytesToPeers, bytesToClients atomic.Uint64
	pktsToPeers, pktsToClients   atomic.Uint64
	drops                        [numDropReasons]atomic.Uint64
}

type loop struct {
	srv  *Server
	epfd int
	// epFile registers epfd with the runtime's poller; it owns epfd.
	epFile *os.File
	epRaw  syscall.RawConn
	pollFn func(uintptr) bool
	evfd   int
	lis    []*udpListener
	// relays indexes relayed sockets by fd, for epoll events; owned holds every
	// allocation whose relayed socket this loop polls.
	relays []*relaySock
	owned  map[*allocation]struct{}
	// local indexes the relayed sockets by relayed address, for handing data between
	// two allocations on this loop in memory.
	local map[addrKey]*relaySock

	mu      sync.Mutex
	cmds    []func()
	exited  bool
	done    chan struct{}
	quit    bool // set on the loop: leave after this wake
	running bool // set before run starts, by Start

	now   time.Time
	nowNs int64

	events  []unix.EpollEvent
	nEvents int
	waitErr error
	slots   [][]byte          // send slots: datagrams read from peers, queued for clients
	rxb     [batchSize][]byte // the slots a read from a peer goes into
	crx     [][]byte          // buffers for reads from clients
	rx      *mmsgs
	tx      *mmsgs
	txFD    []int
	nTx     int
	nSlot   int // slots in use by queued sends
	rc      reqCtx
	rng     *rand.ChaCha8
	txid    [12]byte
	ctr     counters
}

func newLoop(s *Server) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	// Non-blocking, so os.NewFile hands it to the runtime's poller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, err
	}
	epFile := os.NewFile(uintptr(epfd), "epoll")
	epRaw, err := epFile.SyscallConn()
	if err != nil {
		epFile.Close()
		return nil, err
	}
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		epFile.Close()
		return nil, err
	}
	l := &loop{
		srv:    s,
		epfd:   epfd,
		epFile: epFile,
		epRaw:  epRaw,
		evfd:   evfd,
		owned:  make(map[*allocation]struct{}),
		local:  make(map[addrKey]*relaySock),
		done:   make(chan struct{}),
		events: make([]unix.EpollEvent, 128),
		slots:  make([][]byte, numSlots),
		rx:     newMmsgs(batchSize),
		tx:     newMmsgs(numSlots),
		txFD:   make([]int, numSlots),
		rc:     reqCtx{transport: UDP},
	}
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[:], rand.Uint64())
	binary.LittleEndian.PutUint64(seed[8:], rand.Uint64())
	l.rng = rand.NewChaCha8(seed)
	// One allocation for all slots; the kernel backs only the pages that large
	// datagrams touch.
	mem := make([]byte, (numSlots+batchSize)*slotSize)
	for i := range l.slots {
		l.slots[i] = mem[i*slotSize : (i+1)*slotSize : (i+1)*slotSize]
	}
	mem = mem[numSlots*slotSize:]
	l.crx = make([][]byte, batchSize)
	for i := range l.crx {
		l.crx[i] = mem[i*slotSize : i*slotSize+maxPayload]
	}
	l.rc.loop = l
	l.pollFn = l.poll
	if err := l.watch(evfd); err != nil {
		l.closeFDs()
		return nil, err
	}
	return l, nil
}

func (l *loop) watch(fd int) error {
	return unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)})
}

func (l *loop) addListener(fd int, v6 bool) error {
	if err := l.watch(fd); err != nil {
		return err
	}
	l.lis = append(l.lis, &udpListener{fd: fd, v6: v6, allocs: make(map[addrKey]*allocation)})
	return nil
}

// post runs f on the loop. It reports false, without running f, once the loop has
// exited.
func (l *loop) post(f func()) bool {
	l.mu.Lock()
	if l.exited {
		l.mu.Unlock()
		return false
	}
	wake := len(l.cmds) == 0
	l.cmds = append(l.cmds, f)
	l.mu.Unlock()
	if wake {
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		unix.Write(l.evfd, one[:])
	}
	return true
}

// call runs f on the loop and waits for it. It must not be called from the loop.
func (l *loop) call(f func()) bool {
	ran := make(chan struct{})
	if !l.post(func() { f(); close(ran) }) {
		return false
	}
	select {
	case <-ran:
		return true
	case <-l.done:
		// The loop runs what was queued before it exits, so f may have run after
		// all; ran says for sure.
		select {
		case <-ran:
			return true
		default:
			return false
		}
	}
}

func (l *loop) run() {
	defer close(l.done)
	for !l.quit {
		n, err := l.epollWait()
		if err != nil {
			l.srv.log.Error("epoll_wait", "err", err)
			break
		}
		l.tick()
		// Commands first: a sweep or a registration posted before a packet arrived
		// takes effect before the packet is handled.
		for i := range n {
			if int(l.events[i].Fd) == l.evfd {
				l.runCommands()
			}
		}
		for i := range n {
			fd := int(l.events[i].Fd)
			if fd == l.evfd {
				continue
			}
			if lis := l.listener(fd); lis != nil {
				l.readClients(lis)
				continue
			}
			if fd < len(l.relays) && l.relays[fd] != nil {
				l.readPeers(l.relays[fd])
			}
		}
		l.flush()
	}
	l.shutdown()
}

func (l *loop) tick() {
	l.now = l.srv.clock.Now()
	l.nowNs = int64(l.now.Sub(l.srv.epoch))
	l.rc.now = l.now
}

func (l *loop) listener(fd int) *udpListener {
	for _, lis := range l.lis {
		if lis.fd == fd {
			return lis
		}
	}
	return nil
}

func (l *loop) runCommands() {
	var b [8]byte
	unix.Read(l.evfd, b[:])
	l.mu.Lock()
	cmds := l.cmds
	l.cmds = nil
	l.mu.Unlock()
	for _, f := range cmds {
		f()
	}
}

// shutdown ends every allocation on the loop and closes its sockets.
func (l *loop) shutdown() {
	l.mu.Lock()
	l.exited = true
	cmds := l.cmds
	l.cmds = nil
	l.mu.Unlock()
	l.tick()
	for _, f := range cmds {
		f() // commands queued before exit still run: they may be waited on
	}
	for a := range l.owned {
		l.removeAlloc(a, "shutdown")
	}
	l.closeFDs()
}

func (l *loop) closeFDs() {
	for _, lis := range l.lis {
		unix.Close(lis.fd)
	}
	unix.Close(l.evfd)
	l.epFile.Close()
}

// addAlloc makes the loop poll a's relayed socket and, for a UDP client, route the
// client's 5-tuple to a.
func (l *loop) addAlloc(a *allocation) bool {
	fd := a.rs.fd
	if err := l.watch(fd); err != nil {
		l.srv.log.Error("epoll add", "err", err)
		return false
	}
	for fd >= len(l.relays) {
		l.relays = append(l.relays, make([]*relaySock, len(l.relays)+64)...)
	}
	a.loop = l
	l.relays[fd] = a.rs
	l.owned[a] = struct{}{}
	l.local[a.rs.key] = a.rs
	if a.lis != nil {
		a.lis.allocs[a.clientKey] = a
	}
	return true
}

// removeAlloc ends an allocation: it stops routing to it, closes its socket and reports
// the session's end. It is idempotent.
func (l *loop) removeAlloc(a *allocation, reason string) {
	a.mu.Lock()
	if a.deleted {
		a.mu.Unlock()
		return
	}
	a.deleted = true
	a.mu.Unlock()
	if a.lis != nil && a.lis.allocs[a.clientKey] == a {
		delete(a.lis.allocs, a.clientKey)
	}
	delete(l.owned, a)
	if l.local[a.rs.key] == a.rs {
		delete(l.local, a.rs.key)
	}
	fd := a.rs.fd
	unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	if fd < len(l.relays) {
		l.relays[fd] = nil
	}
	a.rs.mu.Lock()
	a.rs.closed = true
	unix.Close(fd)
	a.rs.mu.Unlock()
	l.srv.ended(a, reason, l.now)
}

// sweep expires allocations, permissions and channels and ends idle sessions.
func (l *loop) sweep() {
	l.tick()
	idle := l.srv.cfg.SessionTimeout
	for a := range l.owned {
		a.mu.Lock()
		reason := ""
		switch {
		case !l.now.Before(a.expires):
			reason = "expired"
		case idle > 0 && a.idleLocked(l.now, idle):
			reason = "idle"
		default:
			if a.expireLocked(l.now) {
				a.publishLocked()
			}
		}
		a.mu.Unlock()
		if reason != "" {
			l.removeAlloc(a, reason)
		}
	}
}

func (l *loop) drop(r DropReason) { l.ctr.drops[r].Add(1) }

// readClients reads one batch from a client-facing socket. What a client sends is
// relayed or answered before the next read, so these buffers are not the send slots.
func (l *loop) readClients(lis *udpListener) {
	n, err := recvmmsg(lis.fd, l.rx, l.crx)
	if err != nil {
		return
	}
	for i := range n {
		h := &l.rx.hdrs[i]
		if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
			l.drop(DropTooLarge)
			continue
		}
		l.fromClient(lis, l.crx[i][:h.Len], keyFromRaw(&l.rx.names[i]))
	}
}

// fromClient handles one datagram from a UDP client.
func (l *loop) fromClient(lis *udpListener, b []byte, from addrKey) {
	if isChannelData(b) {
		a := lis.allocs[from]
		if a == nil {
			l.drop(DropNoAllocation)
			return
		}
		ch, payload, err := parseChannelData(b)
		if err != nil {
			l.drop(DropMalformed)
			return
		}
		r := a.routes.Load().byNumber(ch)
		switch {
		case r == nil:
			l.drop(DropNoChannel)
		case !r.ok:
			l.drop(DropNoPermission)
		default:
			l.toPeer(a, payload, r.peer, &r.sa)
		}
		return
	}
	if !looksLikeSTUN(b) {
		l.drop(DropMalformed)
		return
	}
	a := lis.allocs[from]
	if binary.BigEndian.Uint16(b) == typeSendIndication {
		if a == nil {
			l.drop(DropNoAllocation)
			return
		}
		peer, data, ok := parseSendIndication(b)
		if !ok {
			l.drop(DropMalformed)
			return
		}
		if _, ok := a.routes.Load().perms[peer.ip]; !ok || peer.is4() == a.rs.v6 {
			l.drop(DropNoPermission)
			return
		}
		sa := sockaddrOf(peer, a.rs.v6)
		l.toPeer(a, data, peer, &sa)
		return
	}
	rc := &l.rc
	rc.client = from.addrPort()
	rc.alloc = a
	rc.lis = lis
	if resp := l.srv.handle(rc, b); resp != nil {
		sa := sockaddrOf(from, lis.v6)
		if err := sendto(lis.fd, resp, &sa); err != nil {
			l.srv.log.Debug("send response", "err", err)
		}
	}
	rc.alloc = nil
}

// toPeer relays a client's payload from its allocation's relayed socket to peer.
//
// A peer that is another relayed address on this loop (two clients relayed through
// one relay, as when both sit behind symmetric NATs) gets the datagram handed across
// in memory: the same checks and accounting as the kernel's loopback would lead to,
// without two system calls and a trip through the network stack.
func (l *loop) toPeer(a *allocation, payload []byte, peer addrKey, sa *sockaddr) {
	if r, ok := a.admit(len(payload), l.nowNs); !ok {
		l.drop(r)
		return
	}
	if l.srv.isSelf(peer) {
		l.drop(DropForbidden)
		return
	}
	if other := l.localRelay(peer); other != nil {
		i := l.takeSlot()
		copy(l.slots[i][headroom:], payload)
		l.nSlot++
		l.fromPeer(other.alloc, other.alloc.routes.Load(), a.rs.key, i, len(payload))
	} else if err := sendto(a.rs.fd, payload, sa); err != nil {
		l.drop(DropSendError)
		return
	}
	a.bytesIn.Add(uint64(len(payload)))
	a.pktsIn.Add(1)
	l.ctr.bytesToPeers.Add(uint64(len(payload)))
	l.ctr.pktsToPeers.Add(1)
}

// localRelay returns the relayed socket this loop has at peer, if any.
func (l *loop) localRelay(peer addrKey) *relaySock {
	if len(l.local) == 0 || peer.ip != l.srv.relayKey4 && peer.ip != l.srv.relayKey6 {
		return nil
	}
	return l.local[peer]
}

// takeSlot returns a free send slot, flushing queued sends if there is none.
func (l *loop) takeSlot() int {
	if l.nSlot == numSlots {
		l.flush()
	}
	return l.nSlot
}

// readPeers reads one batch from a relayed socket and queues it for the client.
func (l *loop) readPeers(rs *relaySock) {
	if numSlots-l.nSlot < batchSize {
		l.flush()
	}
	base := l.nSlot
	for i := range batchSize {
		l.rxb[i] = l.slots[base+i][headroom : headroom+maxPayload]
	}
	n, err := recvmmsg(rs.fd, l.rx, l.rxb[:])
	if err != nil {
		return
	}
	// Every slot read into stays reserved until the flush, whether or not it is
	// queued: cheaper than compacting.
	l.nSlot += n
	a := rs.alloc
	rt := a.routes.Load()
	for i := range n {
		h := &l.rx.hdrs[i]
		if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
			l.drop(DropTooLarge)
			continue
		}
		l.fromPeer(a, rt, keyFromRaw(&l.rx.names[i]), base+i, int(h.Len))
	}
}

// fromPeer relays size bytes from peer, sitting in slot i past its headroom, to a's
// client: as ChannelData if a channel is bound to the peer, else as a Data indication.
func (l *loop) fromPeer(a *allocation, rt *routes, peer addrKey, i, size int) {
	if _, ok := rt.perms[peer.ip]; !ok {
		l.drop(DropNoPermission)
		return
	}
	if r, ok := a.admit(size, l.nowNs); !ok {
		l.drop(r)
		return
	}
	b := l.slots[i]
	var msg []byte
	if c := rt.byPeer(peer); c != nil && c.ok {
		putChannelHeader(b[headroom-4:], c.num, size)
		msg = b[headroom-4 : headroom+size]
		if a.tc != nil {
			// Over a stream, ChannelData is padded to four bytes.
			msg = b[headroom-4 : headroom+pad4(size)]
			clear(b[headroom+size : headroom+pad4(size)])
		}
	} else {
		l.rng.Read(l.txid[:])
		start := putDataIndication(b, headroom, size, peer, &l.txid)
		msg = b[start : headroom+pad4(size)]
	}
	if a.tc != nil {
		if !a.tc.enqueue(msg, false) {
			l.drop(DropCongested)
			return
		}
	} else {
		l.queue(a.lis.fd, msg, &a.clientSA)
	}
	a.bytesOut.Add(uint64(size))
	a.pktsOut.Add(1)
	l.ctr.bytesToClients.Add(uint64(size))
	l.ctr.pktsToClients.Add(1)
}

// queue adds one datagram to the loop's pending sendmmsg.
func (l *loop) queue(fd int, b []byte, sa *sockaddr) {
	i := l.nTx
	l.tx.iovs[i].Base = &b[0]
	l.tx.iovs[i].SetLen(len(b))
	h := &l.tx.hdrs[i].Hdr
	h.Name = &sa.b[0]
	h.Namelen = sa.n
	l.txFD[i] = fd
	l.nTx++
}

// flush sends everything queued, one sendmmsg per run of datagrams on the same socket.
func (l *loop) flush() {
	for start := 0; start < l.nTx; {
		fd := l.txFD[start]
		end := start + 1
		for end < l.nTx && l.txFD[end] == fd {
			end++
		}
		for start < end {
			n, err := sendmmsg(fd, l.tx.hdrs[start:end])
			if err != nil {
				// The first datagram failed (a full socket buffer, or an error the
				// kernel keeps for this destination): drop it and go on.
				l.drop(DropSendError)
				n = 1
			}
			start += n
		}
	}
	l.nTx = 0
	l.nSlot = 0
}

// epollWait returns the ready events, waiting in the Go runtime's poller (where the
// loop's epoll fd is registered) while there are none. Waiting there rather than in a
// blocking epoll_wait keeps the runtime's bookkeeping cheap: a goroutine blocked in a
// system call has its P retaken and makes sysmon poll every 20 µs, which on a loop that
// wakes thousands of times a second costs more than the relaying itself.
func (l *loop) epollWait() (int, error) {
	l.nEvents, l.waitErr = 0, nil
	if err := l.epRaw.Read(l.pollFn); err != nil {
		return 0, err
	}
	return l.nEvents, l.waitErr
}

// poll is epollWait's callback for the runtime poller: it reports false, to wait, when
// nothing is ready. It is bound once (pollFn) so waiting does not allocate.
func (l *loop) poll(uintptr) bool {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(l.epfd), uintptr(unsafe.Pointer(&l.events[0])), uintptr(len(l.events)), 0, 0, 0)
	switch e {
	case 0:
		l.nEvents = int(r)
		return r > 0
	case unix.EINTR:
		return false
	}
	l.waitErr = e
	return true
}
