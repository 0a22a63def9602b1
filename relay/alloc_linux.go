package relay

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Limits on one allocation's state, so one client cannot make the relay's per-packet
// lookups or memory grow without bound; over them requests get 508.
const (
	maxPermissions = 256
	maxChannels    = 128
	maxPeersListed = 16
)

// relaySock is an allocation's relayed-address socket.
type relaySock struct {
	fd    int
	v6    bool
	addr  netip.AddrPort
	key   addrKey // addr
	alloc *allocation

	// mu is held shared by senders that are not the owning loop (TCP clients'
	// goroutines) and exclusively by the loop when it closes fd, so no send can reach
	// an fd number the kernel has already reused.
	mu     sync.RWMutex
	closed bool
}

// allocation is one TURN allocation: a client 5-tuple, its relayed socket, permissions
// and channels.
//
// The data path never takes mu: it reads routes, an immutable snapshot the control path
// replaces whenever permissions or channels change. mu guards the control state.
type allocation struct {
	id        uint64
	srv       *Server
	loop      *loop // polls rs and owns its lifetime
	rs        *relaySock
	transport Transport
	client    netip.AddrPort
	clientKey addrKey
	clientSA  sockaddr     // UDP clients: where data for the client goes
	lis       *udpListener // UDP clients: the socket that carries the 5-tuple
	tc        *tcpConn     // TCP and TLS clients
	user      string
	key       []byte // long-term key, for response integrity
	start     time.Time
	bucket    *bucket // nil without a bandwidth limit

	routes                             atomic.Pointer[routes]
	bytesIn, bytesOut, pktsIn, pktsOut atomic.Uint64

	mu         sync.Mutex
	deleted    bool
	started    bool // OnSessionStart has been queued
	expires    time.Time
	perms      map[[16]byte]time.Time
	chans      map[uint16]*channel
	peers      []netip.AddrPort
	allocTx    [12]byte
	allocResp  []byte // the success response, for a retransmitted Allocate
	lastBytes  uint64
	lastActive time.Time
}

type channel struct {
	peer    addrKey
	expires time.Time
}

// routes is what the data path needs: permitted peer IPs and bound channels.
type routes struct {
	perms map[[16]byte]struct{}
	chans []chanRoute
}

type chanRoute struct {
	num  uint16
	peer addrKey
	sa   sockaddr
	// ok is false while the channel's peer has no permission: it relays nothing until
	// the client installs one again.
	ok bool
}

var emptyRoutes = &routes{}

func (r *routes) byNumber(n uint16) *chanRoute {
	for i := range r.chans {
		if r.chans[i].num == n {
			return &r.chans[i]
		}
	}
	return nil
}

func (r *routes) byPeer(k addrKey) *chanRoute {
	for i := range r.chans {
		if r.chans[i].peer == k {
			return &r.chans[i]
		}
	}
	return nil
}

// publishLocked replaces the data path's snapshot with the current state.
func (a *allocation) publishLocked() {
	r := &routes{perms: make(map[[16]byte]struct{}, len(a.perms))}
	for ip := range a.perms {
		r.perms[ip] = struct{}{}
	}
	for n, c := range a.chans {
		_, ok := a.perms[c.peer.ip]
		r.chans = append(r.chans, chanRoute{num: n, peer: c.peer, sa: sockaddrOf(c.peer, a.rs.v6), ok: ok})
	}
	a.routes.Store(r)
}

// permitLocked installs or refreshes a permission for peer's IP and reports whether the
// set of permitted IPs changed.
func (a *allocation) permitLocked(peer addrKey, now time.Time) bool {
	_, had := a.perms[peer.ip]
	if a.perms == nil {
		a.perms = make(map[[16]byte]time.Time)
	}
	a.perms[peer.ip] = now.Add(PermissionLifetime)
	if !had && len(a.peers) < maxPeersListed {
		a.peers = append(a.peers, peer.addrPort())
	}
	return !had
}

// expireLocked drops expired permissions and channels and reports whether anything went.
func (a *allocation) expireLocked(now time.Time) bool {
	changed := false
	for ip, exp := range a.perms {
		if !now.Before(exp) {
			delete(a.perms, ip)
			changed = true
		}
	}
	for n, c := range a.chans {
		if !now.Before(c.expires) {
			delete(a.chans, n)
			changed = true
		}
	}
	return changed
}

// idleLocked reports whether the allocation relayed nothing for d (d > 0).
func (a *allocation) idleLocked(now time.Time, d time.Duration) bool {
	total := a.bytesIn.Load() + a.bytesOut.Load() + a.pktsIn.Load() + a.pktsOut.Load()
	if total != a.lastBytes || a.lastActive.IsZero() {
		a.lastBytes, a.lastActive = total, now
		return false
	}
	return now.Sub(a.lastActive) >= d
}

// info describes the session for the hooks.
func (a *allocation) infoLocked() SessionInfo {
	return SessionInfo{
		ID:         a.id,
		User:       a.user,
		Transport:  a.transport,
		Client:     a.client,
		Relayed:    a.rs.addr,
		Peers:      append([]netip.AddrPort(nil), a.peers...),
		BytesIn:    a.bytesIn.Load(),
		BytesOut:   a.bytesOut.Load(),
		PacketsIn:  a.pktsIn.Load(),
		PacketsOut: a.pktsOut.Load(),
		Start:      a.start,
	}
}

// admit charges n bytes to the session's and the relay's token buckets.
func (a *allocation) admit(n int, now int64) (DropReason, bool) {
	if a.bucket != nil && !a.bucket.take(n, now) {
		return DropBandwidth, false
	}
	if c := a.srv.capacity; c != nil && !c.take(n, now) {
		return DropCapacity, false
	}
	return 0, true
}

// bucket is a token bucket in bytes. A packet passes while the bucket is not empty and
// may take it into debt, so packets of any size pass and the long-run rate is exact.
type bucket struct {
	mu     sync.Mutex
	rate   float64 // bytes per nanosecond
	burst  float64
	tokens float64
	last   int64
}

func newBucket(bytesPerSecond int64) *bucket {
	if bytesPerSecond <= 0 {
		return nil
	}
	// A tenth of a second of burst smooths scheduling jitter without letting a session
	// run much over its rate in any second.
	burst := max(float64(bytesPerSecond)/10, 1500)
	return &bucket{rate: float64(bytesPerSecond) / 1e9, burst: burst, tokens: burst, last: -1}
}

func (b *bucket) take(n int, now int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last >= 0 && now > b.last {
		b.tokens = min(b.burst, b.tokens+float64(now-b.last)*b.rate)
	}
	if b.last < now {
		b.last = now
	}
	if b.tokens <= 0 {
		return false
	}
	b.tokens -= float64(n)
	return true
}
