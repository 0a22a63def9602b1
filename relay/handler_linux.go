package relay

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net/netip"
	"time"

	"github.com/pion/stun/v3"
)

// reqCtx carries what a control request needs from the transport it came on. Each loop
// and each TCP connection keeps one, so requests decode and encode without allocating
// their messages anew.
type reqCtx struct {
	transport Transport
	client    netip.AddrPort
	alloc     *allocation  // the 5-tuple's allocation, nil if none
	loop      *loop        // set when the request runs on a loop (UDP clients)
	lis       *udpListener // UDP clients
	tc        *tcpConn     // TCP and TLS clients
	now       time.Time
	m, resp   stun.Message
}

// Comprehension-required attributes the relay understands or may safely ignore in a
// request. Anything else below 0x8000 gets 420 Unknown Attribute (RFC 8489 §7.3.1).
var knownAttrs = map[stun.AttrType]bool{
	stun.AttrUsername: true, stun.AttrMessageIntegrity: true, stun.AttrErrorCode: true,
	stun.AttrChannelNumber: true, stun.AttrLifetime: true, stun.AttrXORPeerAddress: true,
	stun.AttrData: true, stun.AttrRealm: true, stun.AttrNonce: true,
	stun.AttrXORRelayedAddress: true, stun.AttrRequestedAddressFamily: true,
	stun.AttrEvenPort: true, stun.AttrRequestedTransport: true, stun.AttrDontFragment: true,
	stun.AttrMessageIntegritySHA256: true, stun.AttrPasswordAlgorithm: true,
	stun.AttrUserhash: true, stun.AttrXORMappedAddress: true, stun.AttrReservationToken: true,
	stun.AttrPriority: true, stun.AttrUseCandidate: true,
	0x0010: true, // BANDWIDTH, from TURN drafts; some clients still send it
}

// handle answers one STUN message from a client and returns the response to send, or
// nil. Indications and responses get none; Send indications take the data path and do
// not come here.
func (s *Server) handle(rc *reqCtx, raw []byte) []byte {
	m := &rc.m
	m.Raw = raw
	if err := m.Decode(); err != nil || m.Type.Class != stun.ClassRequest || !s.allowRequest(rc) {
		return nil
	}
	var unknown stun.UnknownAttributes
	for _, a := range m.Attributes {
		if a.Type < 0x8000 && !knownAttrs[a.Type] {
			unknown = append(unknown, a.Type)
		}
	}
	if len(unknown) > 0 {
		return s.respond(rc, stun.ClassErrorResponse, nil, errorCode(stun.CodeUnknownAttribute, "Unknown Attribute"), unknown)
	}
	switch m.Type.Method {
	case stun.MethodBinding:
		return s.respond(rc, stun.ClassSuccessResponse, nil, xorAttr{stun.AttrXORMappedAddress, rc.client})
	case stun.MethodAllocate:
		return s.allocate(rc)
	case stun.MethodRefresh:
		return s.refresh(rc)
	case stun.MethodCreatePermission:
		return s.createPermission(rc)
	case stun.MethodChannelBind:
		return s.channelBind(rc)
	}
	return s.respond(rc, stun.ClassErrorResponse, nil, errorCode(stun.CodeBadRequest, "Bad Request: unknown method"))
}

// respond builds a response to rc.m into rc.resp: attributes, then MESSAGE-INTEGRITY
// with key (when the request was authenticated), then FINGERPRINT if the request had one.
func (s *Server) respond(rc *reqCtx, class stun.MessageClass, key []byte, attrs ...stun.Setter) []byte {
	r := &rc.resp
	r.Reset()
	r.Type = stun.NewType(rc.m.Type.Method, class)
	r.TransactionID = rc.m.TransactionID
	r.WriteHeader()
	for _, a := range attrs {
		if err := a.AddTo(r); err != nil {
			s.log.Error("encode response", "err", err)
			return nil
		}
	}
	if key != nil {
		if err := stun.MessageIntegrity(key).AddTo(r); err != nil {
			return nil
		}
	}
	if rc.m.Contains(stun.AttrFingerprint) {
		if err := stun.Fingerprint.AddTo(r); err != nil {
			return nil
		}
	}
	return r.Raw
}

func (s *Server) fail(rc *reqCtx, key []byte, code stun.ErrorCode, reason string) []byte {
	return s.respond(rc, stun.ClassErrorResponse, key, errorCode(code, reason))
}

// challenge is a 401 or 438 carrying the realm and a fresh nonce.
func (s *Server) challenge(rc *reqCtx, code stun.ErrorCode, reason string) []byte {
	return s.respond(rc, stun.ClassErrorResponse, nil, errorCode(code, reason),
		stun.NewRealm(s.auth.realm), stun.NewNonce(s.auth.nonce(rc.client.Addr(), rc.now)))
}

// authenticate checks a request's long-term credentials. On failure it returns the
// error response to send instead.
func (s *Server) authenticate(rc *reqCtx) (user string, key []byte, errResp []byte) {
	m := &rc.m
	if !m.Contains(stun.AttrMessageIntegrity) {
		return "", nil, s.challenge(rc, stun.CodeUnauthorized, "Unauthorized")
	}
	var (
		u     stun.Username
		realm stun.Realm
		nonce stun.Nonce
	)
	if u.GetFrom(m) != nil || realm.GetFrom(m) != nil || nonce.GetFrom(m) != nil {
		return "", nil, s.fail(rc, nil, stun.CodeBadRequest, "Bad Request: credentials incomplete")
	}
	if !s.auth.nonceValid(string(nonce), rc.client.Addr(), rc.now) {
		return "", nil, s.challenge(rc, stun.CodeStaleNonce, "Stale Nonce")
	}
	if string(realm) != s.auth.realm {
		return "", nil, s.challenge(rc, stun.CodeUnauthorized, "Unauthorized: wrong realm")
	}
	key, ok := s.auth.key(string(u), rc.now)
	if !ok || stun.MessageIntegrity(key).Check(m) != nil {
		return "", nil, s.challenge(rc, stun.CodeUnauthorized, "Unauthorized")
	}
	if rc.alloc != nil && rc.alloc.user != string(u) {
		return "", nil, s.fail(rc, nil, stun.CodeWrongCredentials, "Wrong Credentials")
	}
	return string(u), key, nil
}

// lifetime is the LIFETIME a request asks for (DefaultLifetime without one), clamped
// to [DefaultLifetime, MaxLifetime]; zero stays zero (a Refresh that deletes).
func lifetime(m *stun.Message) time.Duration {
	v, err := m.Get(stun.AttrLifetime)
	if err != nil || len(v) != 4 {
		return DefaultLifetime
	}
	d := time.Duration(binary.BigEndian.Uint32(v)) * time.Second
	if d == 0 {
		return 0
	}
	return min(max(d, DefaultLifetime), MaxLifetime)
}

func (s *Server) allocate(rc *reqCtx) []byte {
	user, key, errResp := s.authenticate(rc)
	if errResp != nil {
		return errResp
	}
	m := &rc.m
	if a := rc.alloc; a != nil {
		a.mu.Lock()
		resp := a.allocResp
		same := a.allocTx == m.TransactionID
		a.mu.Unlock()
		if same {
			return resp // a retransmission: the same answer again
		}
		return s.fail(rc, key, stun.CodeAllocMismatch, "Allocation Mismatch")
	}
	v, err := m.Get(stun.AttrRequestedTransport)
	if err != nil || len(v) != 4 {
		return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: REQUESTED-TRANSPORT missing")
	}
	if v[0] != 17 {
		return s.fail(rc, key, stun.CodeUnsupportedTransProto, "Unsupported Transport Protocol")
	}
	var even, reserve, v6 bool
	if v, err := m.Get(stun.AttrEvenPort); err == nil {
		if len(v) != 1 {
			return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: EVEN-PORT")
		}
		even, reserve = true, v[0]&0x80 != 0
	}
	var token []byte
	if v, err := m.Get(stun.AttrReservationToken); err == nil {
		if len(v) != 8 || even {
			return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: RESERVATION-TOKEN")
		}
		token = v
	}
	if v, err := m.Get(stun.AttrRequestedAddressFamily); err == nil {
		if len(v) != 4 || token != nil {
			return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: REQUESTED-ADDRESS-FAMILY")
		}
		switch v[0] {
		case familyIPv4:
		case familyIPv6:
			v6 = true
		default:
			return s.fail(rc, key, stun.CodeAddrFamilyNotSupported, "Address Family not Supported")
		}
	}
	life := lifetime(m)
	if life == 0 {
		life = DefaultLifetime
	}

	if code, reason := s.admit(user, rc.client.Addr(), rc.now); code != 0 {
		return s.fail(rc, key, code, reason)
	}
	rs, resToken, err := s.relaySocket(v6, even, reserve, token, rc.now)
	if err != nil {
		s.release(user, rc.client.Addr())
		if errors.Is(err, errNoIPv6) {
			return s.fail(rc, key, stun.CodeAddrFamilyNotSupported, "Address Family not Supported")
		}
		s.log.Warn("relay socket", "err", err)
		return s.fail(rc, key, stun.CodeInsufficientCapacity, "Insufficient Capacity")
	}
	if m.Contains(stun.AttrDontFragment) {
		if err := setDontFragment(rs.fd, rs.v6); err != nil {
			s.log.Debug("DONT-FRAGMENT", "err", err)
		}
	}

	a := &allocation{
		id:         s.nextID.Add(1),
		srv:        s,
		rs:         rs,
		transport:  rc.transport,
		client:     rc.client,
		clientKey:  keyOf(rc.client),
		lis:        rc.lis,
		tc:         rc.tc,
		user:       user,
		key:        key,
		start:      rc.now,
		bucket:     newBucket(s.cfg.BandwidthLimit),
		expires:    rc.now.Add(life),
		lastActive: rc.now,
		allocTx:    m.TransactionID,
	}
	rs.alloc = a
	if rc.lis != nil {
		a.clientSA = sockaddrOf(a.clientKey, rc.lis.v6)
	}
	a.routes.Store(emptyRoutes)
	attrs := []stun.Setter{
		xorAttr{stun.AttrXORRelayedAddress, rs.addr},
		u32Attr{stun.AttrLifetime, uint32(life / time.Second)},
		xorAttr{stun.AttrXORMappedAddress, rc.client},
	}
	if resToken != nil {
		attrs = append(attrs, rawAttr{stun.AttrReservationToken, resToken})
	}
	resp := s.respond(rc, stun.ClassSuccessResponse, key, attrs...)
	a.allocResp = append([]byte(nil), resp...)

	if !s.register(rc, a) {
		rs.closeUnregistered()
		s.release(user, rc.client.Addr())
		return s.fail(rc, key, stun.CodeInsufficientCapacity, "Insufficient Capacity")
	}
	s.sessionsTotal.Add(1)
	s.log.Debug("allocation", "id", a.id, "user", user, "client", rc.client, "transport", rc.transport, "relayed", rs.addr)
	return resp
}

var (
	errNoIPv6        = errors.New("no IPv6 relay address")
	errNoIPv4        = errors.New("no IPv4 relay address")
	errNoReservation = errors.New("unknown reservation token")
)

// relaySocket opens (or claims from a reservation) the socket for a new allocation.
func (s *Server) relaySocket(v6, even, reserve bool, token []byte, now time.Time) (*relaySock, []byte, error) {
	if token != nil {
		r, ok := s.claimReservation(binary.BigEndian.Uint64(token), now)
		if !ok {
			return nil, nil, errNoReservation
		}
		return &relaySock{fd: r.fd, v6: !r.addr.Addr().Is4(), addr: r.addr, key: keyOf(r.addr)}, nil, nil
	}
	ip := s.relayIP4
	if v6 {
		ip = s.relayIP6
	}
	if !ip.IsValid() {
		if v6 {
			return nil, nil, errNoIPv6
		}
		return nil, nil, errNoIPv4
	}
	fd, addr, rfd, raddr, err := s.ports.bindRelay(ip, even, reserve)
	if err != nil {
		return nil, nil, err
	}
	rs := &relaySock{fd: fd, v6: v6, addr: addr, key: keyOf(addr)}
	if !reserve {
		return rs, nil, nil
	}
	var tok [8]byte
	if _, err := rand.Read(tok[:]); err != nil {
		panic(err)
	}
	s.addReservation(binary.BigEndian.Uint64(tok[:]), rfd, raddr, now.Add(reservationLifetime))
	return rs, tok[:], nil
}

func (s *Server) refresh(rc *reqCtx) []byte {
	_, key, errResp := s.authenticate(rc)
	if errResp != nil {
		return errResp
	}
	a := rc.alloc
	if a == nil {
		return s.fail(rc, key, stun.CodeAllocMismatch, "Allocation Mismatch")
	}
	if v, err := rc.m.Get(stun.AttrRequestedAddressFamily); err == nil && len(v) == 4 {
		if (v[0] == familyIPv6) != a.rs.v6 {
			return s.fail(rc, key, stun.CodePeerAddrFamilyMismatch, "Peer Address Family Mismatch")
		}
	}
	life := lifetime(&rc.m)
	a.mu.Lock()
	if a.deleted {
		a.mu.Unlock()
		return s.fail(rc, key, stun.CodeAllocMismatch, "Allocation Mismatch")
	}
	if life > 0 {
		a.expires = rc.now.Add(life)
	}
	a.mu.Unlock()
	if life == 0 {
		s.deleteAlloc(rc.loop, a, "deleted")
	}
	return s.respond(rc, stun.ClassSuccessResponse, key, u32Attr{stun.AttrLifetime, uint32(life / time.Second)})
}

// peerFor decodes and vets one XOR-PEER-ADDRESS value for allocation a.
func (s *Server) peerFor(rc *reqCtx, a *allocation, key, v []byte) (addrKey, []byte) {
	peer, ok := xorAddr(v, rc.m.TransactionID[:])
	if !ok {
		return peer, s.fail(rc, key, stun.CodeBadRequest, "Bad Request: XOR-PEER-ADDRESS")
	}
	if peer.is4() == a.rs.v6 {
		return peer, s.fail(rc, key, stun.CodePeerAddrFamilyMismatch, "Peer Address Family Mismatch")
	}
	if !s.policy.allowed(peer.addrPort().Addr()) || rc.m.Type.Method == stun.MethodChannelBind && s.isSelf(peer) {
		return peer, s.fail(rc, key, stun.CodeForbidden, "Forbidden: peer address not allowed")
	}
	return peer, nil
}

func (s *Server) createPermission(rc *reqCtx) []byte {
	_, key, errResp := s.authenticate(rc)
	if errResp != nil {
		return errResp
	}
	a := rc.alloc
	if a == nil {
		return s.fail(rc, key, stun.CodeAllocMismatch, "Allocation Mismatch")
	}
	var peers []addrKey
	for _, at := range rc.m.Attributes {
		if at.Type != stun.AttrXORPeerAddress {
			continue
		}
		peer, errResp := s.peerFor(rc, a, key, at.Value)
		if errResp != nil {
			return errResp // all or nothing: RFC 8656 §9.2
		}
		peers = append(peers, peer)
	}
	if len(peers) == 0 {
		return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: XOR-PEER-ADDRESS missing")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.deleted {
		return s.fail(rc, key, stun.CodeAllocMismatch, "Allocation Mismatch")
	}
	if len(a.perms)+len(peers) > maxPermissions {
		fresh := 0
		for _, p := range peers {
			if _, ok := a.perms[p.ip]; !ok {
				fresh++
			}
		}
		if len(a.perms)+fresh > maxPermissions {
			return s.fail(rc, key, stun.CodeInsufficientCapacity, "Insufficient Capacity: too many permissions")
		}
	}
	changed := false
	for _, p := range peers {
		changed = a.permitLocked(p, rc.now) || changed
	}
	if changed {
		a.publishLocked()
	}
	s.maybeStartLocked(a)
	return s.respond(rc, stun.ClassSuccessResponse, key)
}

func (s *Server) channelBind(rc *reqCtx) []byte {
	_, key, errResp := s.authenticate(rc)
	if errResp != nil {
		return errResp
	}
	a := rc.alloc
	if a == nil {
		return s.fail(rc, key, stun.CodeAllocMismatch, "Allocation Mismatch")
	}
	v, err := rc.m.Get(stun.AttrChannelNumber)
	if err != nil || len(v) != 4 {
		return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: CHANNEL-NUMBER")
	}
	num := binary.BigEndian.Uint16(v)
	if num < minChannel || num > maxChannel {
		return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: channel number out of range")
	}
	pv, err := rc.m.Get(stun.AttrXORPeerAddress)
	if err != nil {
		return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: XOR-PEER-ADDRESS missing")
	}
	peer, errResp := s.peerFor(rc, a, key, pv)
	if errResp != nil {
		return errResp
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.deleted {
		return s.fail(rc, key, stun.CodeAllocMismatch, "Allocation Mismatch")
	}
	c, bound := a.chans[num]
	if bound && c.peer != peer {
		return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: channel bound to another peer")
	}
	for n, c := range a.chans {
		if c.peer == peer && n != num {
			return s.fail(rc, key, stun.CodeBadRequest, "Bad Request: peer bound to another channel")
		}
	}
	if !bound {
		if len(a.chans) >= maxChannels {
			return s.fail(rc, key, stun.CodeInsufficientCapacity, "Insufficient Capacity: too many channels")
		}
		if a.chans == nil {
			a.chans = make(map[uint16]*channel)
		}
		c = &channel{peer: peer}
		a.chans[num] = c
	}
	c.expires = rc.now.Add(ChannelLifetime)
	if a.permitLocked(peer, rc.now) || !bound {
		a.publishLocked()
	}
	s.maybeStartLocked(a)
	return s.respond(rc, stun.ClassSuccessResponse, key)
}

// maybeStartLocked queues OnSessionStart when an allocation got its first peer.
func (s *Server) maybeStartLocked(a *allocation) {
	if a.started || len(a.peers) == 0 {
		return
	}
	a.started = true
	if s.cfg.OnSessionStart != nil {
		info := a.infoLocked()
		s.hooks.push(func() { s.cfg.OnSessionStart(info) })
	}
}

// Attribute encoders for responses.

type xorAttr struct {
	t  stun.AttrType
	ap netip.AddrPort
}

func (x xorAttr) AddTo(m *stun.Message) error {
	var v [20]byte
	n := putXORAddr(v[:], keyOf(x.ap), m.TransactionID[:])
	m.Add(x.t, v[:n])
	return nil
}

type u32Attr struct {
	t stun.AttrType
	v uint32
}

func (u u32Attr) AddTo(m *stun.Message) error {
	var v [4]byte
	binary.BigEndian.PutUint32(v[:], u.v)
	m.Add(u.t, v[:])
	return nil
}

type rawAttr struct {
	t stun.AttrType
	v []byte
}

func (r rawAttr) AddTo(m *stun.Message) error { m.Add(r.t, r.v); return nil }

func errorCode(c stun.ErrorCode, reason string) stun.Setter {
	return &stun.ErrorCodeAttribute{Code: c, Reason: []byte(reason)}
}
