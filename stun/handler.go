package stun

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strings"

	pion "github.com/pion/stun/v3"

	"peerlink/internal/ratelimit"
)

// maxUnknown bounds the UNKNOWN-ATTRIBUTES of a 420 answer. Listing fewer than the request
// had is allowed; listing them all would let a request choose the answer's size.
const maxUnknown = 16

// responseCap is the capacity of response buffers: the largest answer (IPv6 addresses,
// 128-byte SOFTWARE, every attribute) fits with room to spare.
const responseCap = 512

// handler is the protocol logic shared by every socket of a server. It is immutable once
// built, so workers use it without locks.
type handler struct {
	// addrs are the four UDP sockets' addresses, indexed like ChangeRequest.socket; in
	// single-address mode only addrs[0] is set.
	addrs   [4]netip.AddrPort
	ips     [4]net.IP // addrs' IPs, in the form pion wants
	rfc5780 bool

	software, softwareClassic pion.Software // nil: none

	limiter    *ratelimit.Table // nil: no limit
	changeCost float64

	// Own addresses, never answered: ownPorts are the ports the server listens on, ownIPs
	// its specific IPs; anyIP means it listens on a wildcard address, so every local
	// address (localIPs, loopback) is its own.
	ownPorts [2]uint16
	ownIPs   [2]netip.Addr
	anyIP    bool
	localIPs map[netip.Addr]bool
}

// init sets the handler up for the sockets at addrs (see handler.addrs): rfc5780 when
// there are four.
func (h *handler) init(addrs [4]netip.AddrPort, rfc5780 bool, software string, rl RateLimit) {
	h.addrs = addrs
	h.rfc5780 = rfc5780
	for i, a := range addrs {
		if a.IsValid() {
			h.ips[i] = net.IP(a.Addr().AsSlice())
		}
	}
	h.ownPorts = [2]uint16{addrs[0].Port(), addrs[0].Port()}
	if rfc5780 {
		h.ownPorts[1] = addrs[1].Port()
		h.ownIPs[1] = addrs[2].Addr().WithZone("")
	}
	if ip := addrs[0].Addr(); !ip.IsUnspecified() {
		h.ownIPs[0] = ip.WithZone("")
	} else {
		h.anyIP = true
		h.localIPs = make(map[netip.Addr]bool)
		if ifaddrs, err := net.InterfaceAddrs(); err == nil {
			for _, a := range ifaddrs {
				if pfx, err := netip.ParsePrefix(a.String()); err == nil {
					h.localIPs[pfx.Addr().Unmap().WithZone("")] = true
				}
			}
		}
	}
	if software != "" {
		h.software = pion.NewSoftware(software)
		// RFC 3489 clients read attribute lengths as multiples of four.
		h.softwareClassic = pion.NewSoftware(software + strings.Repeat(" ", (4-len(software)%4)%4))
	}
	if rl = rl.withDefaults(); !rl.Disabled {
		h.limiter = newLimiter(rl)
		h.changeCost = rl.ChangeCost
	}
}

// Error answers, with their RFC 3489 forms whose reason phrases are padded to a multiple
// of four bytes as that RFC requires.
var (
	errBadRequest         = pion.ErrorCodeAttribute{Code: 400, Reason: []byte("Bad Request")}
	errBadRequestClassic  = pion.ErrorCodeAttribute{Code: 400, Reason: []byte("Bad Request ")}
	errUnknownAttr        = pion.ErrorCodeAttribute{Code: 420, Reason: []byte("Unknown Attribute")}
	errUnknownAttrClassic = pion.ErrorCodeAttribute{Code: 420, Reason: []byte("Unknown Attribute   ")}
)

// knownRequired reports whether typ is a comprehension-required attribute the server
// understands in a Binding request. Authentication attributes are understood and
// ignored: the server asks for no credentials. Known attributes that have no business in
// a request (MAPPED-ADDRESS and the like) are ignored as RFC 8489 section 6.3 says.
func knownRequired(typ uint16) bool {
	switch typ {
	case attrMappedAddress, attrChangeRequest, attrSourceAddress, attrChangedAddress,
		attrUsername, attrMessageIntegrity, attrErrorCode, attrUnknownAttributes,
		attrRealm, attrNonce, attrMessageIntegritySHA256, attrPasswordAlgorithm,
		attrUserhash, attrXORMappedAddress, attrPriority, attrUseCandidate, attrPadding:
		return true
	}
	return false
}

var broadcast4 = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// forbidden reports whether an answer to src must not be sent: port 0 (a spoofer's
// favourite: it cannot be a real socket), addresses that are not unicast, and the
// server's own sockets.
func (h *handler) forbidden(src netip.AddrPort) bool {
	a := src.Addr()
	if src.Port() == 0 || !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a == broadcast4 {
		return true
	}
	if p := src.Port(); p != h.ownPorts[0] && p != h.ownPorts[1] {
		return false
	}
	a = a.WithZone("")
	if a == h.ownIPs[0] || a == h.ownIPs[1] {
		return true
	}
	return h.anyIP && (a.IsLoopback() || h.localIPs[a])
}

// worker is the per-goroutine state of the hot path: scratch space and counters.
type worker struct {
	h       *handler
	c       *counters
	unknown [maxUnknown]pion.AttrType
	ipbuf   [16]byte
}

func (w *worker) ip(a netip.Addr) net.IP {
	if a.Is4() {
		b := a.As4()
		copy(w.ipbuf[:], b[:])
		return w.ipbuf[:4]
	}
	b := a.As16()
	copy(w.ipbuf[:], b[:])
	return w.ipbuf[:16]
}

type answer uint8

const (
	answerSuccess answer = iota
	answerBadRequest
	answerUnknown
	answerNoChange       // CHANGE-REQUEST that this server or transport cannot honour
	answerNoResponsePort // RESPONSE-PORT over TCP or from an RFC 3489 client
)

// handle answers msg, received from src on UDP socket on (or over TCP, where on is 0)
// at now nanoseconds. It writes the answer into resp and returns the socket to send it
// from and where to send it: src, or src's IP at the port a RESPONSE-PORT asked for; ok
// is false when the RFC's answer, or the abuse limits', is silence. src must be
// unmapped (IPv4 as IPv4). It never allocates.
func (w *worker) handle(msg []byte, src netip.AddrPort, on int, tcp bool, now int64, resp *pion.Message) (from int, to netip.AddrPort, ok bool) {
	h, c := w.h, w.c
	c.add(cReceived)
	hdr, ok := parseHeader(msg)
	if !ok {
		c.add(cNotSTUN)
		return 0, netip.AddrPort{}, false
	}
	if hdr.typ != typeBindingRequest {
		c.add(cIgnored)
		return 0, netip.AddrPort{}, false
	}
	// Messages without the magic cookie are RFC 3489's: their cookie field is part of
	// the transaction ID and their answers carry the RFC 3489 attributes.
	classic := hdr.cookie != magicCookie

	var (
		change             ChangeRequest
		hasChange, badAttr bool
		responsePort       uint16
		hasResponsePort    bool
		afterMI            bool
		nUnknown           int
	)
	it := newAttrIter(msg)
	for {
		typ, val, off, ok := it.next()
		if !ok {
			break
		}
		if typ == attrFingerprint && !classic {
			if !fingerprintOK(msg, off, val) {
				c.add(cNotSTUN) // RFC 8489 section 6.3: not STUN after all
				return 0, netip.AddrPort{}, false
			}
			continue
		}
		if afterMI && typ != attrMessageIntegritySHA256 {
			continue // RFC 8489 section 14.5
		}
		switch {
		case typ == attrChangeRequest:
			if hasChange {
				continue
			}
			hasChange = true
			if len(val) != 4 {
				badAttr = true
			} else {
				change = ChangeRequest(val[3]) & (ChangeIP | ChangePort)
			}
		case typ == attrResponsePort:
			// RFC 5780 section 7.5: answer to the source's IP at this port. It lets a
			// client learn how long an idle mapping lives; it cannot aim answers at
			// another host.
			if hasResponsePort {
				continue
			}
			hasResponsePort = true
			if len(val) != 4 || binary.BigEndian.Uint16(val) == 0 {
				badAttr = true
			} else {
				responsePort = binary.BigEndian.Uint16(val)
			}
		case typ == attrMessageIntegrity:
			afterMI = true
		case typ < 0x8000 && !knownRequired(typ):
			w.addUnknown(&nUnknown, typ)
		}
	}
	c.add(cRequests)

	kind := answerSuccess
	switch {
	case it.err || badAttr:
		kind = answerBadRequest
	case nUnknown > 0:
		kind = answerUnknown
	case hasResponsePort && (tcp || classic):
		// Over TCP the answer can only come back on the connection.
		kind = answerNoResponsePort
	case hasChange && (!h.rfc5780 || tcp) && (change != 0 || !classic):
		// RFC 5780 section 6.1: a server without an alternate address answers any
		// CHANGE-REQUEST with 420. RFC 3489 clients send CHANGE-REQUEST with no flags
		// in every request; for them that is no change at all.
		kind = answerNoChange
	}
	from = on
	if kind == answerSuccess && !tcp {
		from = on ^ change.socket()
	}

	to = src
	if kind == answerSuccess && hasResponsePort {
		to = netip.AddrPortFrom(src.Addr(), responsePort)
	}
	if h.forbidden(src) || h.forbidden(to) {
		c.add(cForbidden)
		return 0, netip.AddrPort{}, false
	}
	if h.limiter != nil {
		cost := 1.0
		if from != on || to != src {
			cost = h.changeCost
		}
		if !h.limiter.Allow(src.Addr(), cost, now) {
			c.add(cRateLimited)
			return 0, netip.AddrPort{}, false
		}
	}

	resp.Reset()
	resp.TransactionID = hdr.txID
	switch kind {
	case answerSuccess:
		resp.Type = pion.BindingSuccess
		resp.WriteHeader()
		w.addSuccess(resp, src, on, from, tcp, classic)
		c.add(cResponses)
		if from != on {
			c.add(cChanged)
		}
	case answerBadRequest:
		resp.Type = pion.BindingError
		resp.WriteHeader()
		if classic {
			errBadRequestClassic.AddTo(resp)
		} else {
			errBadRequest.AddTo(resp)
		}
		c.add(cBadRequest)
	case answerUnknown, answerNoChange, answerNoResponsePort:
		switch kind {
		case answerNoChange:
			nUnknown = 0
			w.addUnknown(&nUnknown, attrChangeRequest)
		case answerNoResponsePort:
			nUnknown = 0
			w.addUnknown(&nUnknown, attrResponsePort)
		}
		resp.Type = pion.BindingError
		resp.WriteHeader()
		list := w.unknown[:nUnknown]
		if classic {
			errUnknownAttrClassic.AddTo(resp)
			if nUnknown%2 == 1 {
				// RFC 3489 section 11.2.10: repeat one to fill the last word.
				list = append(list, list[nUnknown-1])
			}
		} else {
			errUnknownAttr.AddTo(resp)
		}
		pion.UnknownAttributes(list).AddTo(resp)
		c.add(cUnknownAttr)
	}
	// SOFTWARE is optional: it goes out only while the answer stays within
	// maxAmplification times the request, so that a request with a spoofed source
	// cannot use it to send the victim more (SECURITY.md).
	fits := func(sw pion.Software, tail int) bool {
		return sw != nil && len(resp.Raw)+4+(len(sw)+3)&^3+tail <= maxAmplification*len(msg)
	}
	if classic {
		if fits(h.softwareClassic, 0) {
			h.softwareClassic.AddTo(resp)
		}
		copy(resp.Raw[4:8], msg[4:8])
	} else {
		if fits(h.software, 8) {
			h.software.AddTo(resp)
		}
		pion.Fingerprint.AddTo(resp)
	}
	return from, to, true
}

// maxAmplification bounds an answer's size as a multiple of its request's. The fixed
// part of the largest answer to the smallest request (20 bytes) is 76 bytes; SOFTWARE
// is left out where it would go past the bound.
const maxAmplification = 4

func (w *worker) addUnknown(n *int, typ uint16) {
	if *n == len(w.unknown) {
		return
	}
	for _, t := range w.unknown[:*n] {
		if uint16(t) == typ {
			return
		}
	}
	w.unknown[*n] = pion.AttrType(typ)
	*n++
}

// addSuccess adds the addresses of a Binding success response: the client's mapped
// address, and with RFC 5780 where the answer comes from and the alternate address.
func (w *worker) addSuccess(resp *pion.Message, src netip.AddrPort, on, from int, tcp, classic bool) {
	h := w.h
	mapped := pion.MappedAddress{IP: w.ip(src.Addr()), Port: int(src.Port())}
	full := h.rfc5780 && !tcp
	origin := pion.MappedAddress{IP: h.ips[from], Port: int(h.addrs[from].Port())}
	other := pion.MappedAddress{IP: h.ips[on^3], Port: int(h.addrs[on^3].Port())}
	if classic {
		mapped.AddTo(resp)
		if !h.addrs[from].Addr().IsUnspecified() {
			origin.AddToAs(resp, pion.AttrSourceAddress)
		}
		if full {
			other.AddToAs(resp, pion.AttrChangedAddress)
		}
		return
	}
	pion.XORMappedAddress(mapped).AddTo(resp)
	if full {
		// RFC 5780 section 6.1 wants MAPPED-ADDRESS too, for finding address-rewriting
		// NATs.
		mapped.AddTo(resp)
		origin.AddToAs(resp, pion.AttrResponseOrigin)
		other.AddToAs(resp, pion.AttrOtherAddress)
	}
}
