package mdns

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Announcement timing (RFC 6762 §8.3): at least two unsolicited responses one second
// apart, the interval at least doubling after that.
var announceGaps = []time.Duration{0, time.Second, 2 * time.Second}

// legacyTTL caps TTLs in replies to legacy unicast queries (RFC 6762 §6.7).
const legacyTTL = 10

// Advertiser answers mDNS queries for one peerlink service and announces it. Close
// sends a goodbye.
type Advertiser struct {
	cfg      Config
	log      *slog.Logger
	svc      Service
	instance string // "<nodeid>._peerlink._udp.local."
	host     string // "<nodeid>.local."
	ttl      uint32
	txt      []string
	reann    time.Duration

	t     *transport
	sched *scheduler

	mu        sync.Mutex
	closed    bool
	closeOnce sync.Once
}

// Advertise validates svc, opens the multicast sockets (in the calling goroutine, so
// inside whatever network namespace its thread is in), starts answering queries and
// sends the first announcements. ctx bounds only the start; the advertiser runs until
// Close.
//
// The instance and host names are the NodeID's text form. They are unique per key, so
// the advertiser does not probe for conflicts (RFC 6762 §8.1); a second node with the
// same key is a misconfiguration mDNS cannot fix.
func Advertise(ctx context.Context, cfg Config, svc Service) (*Advertiser, error) {
	a, err := newAdvertiser(cfg, svc)
	if err != nil {
		return nil, err
	}
	t, err := openTransport(ctx, &a.cfg, a.handle)
	if err != nil {
		a.sched.close()
		return nil, err
	}
	a.t = t
	a.log.Debug("mdns: advertising", "instance", a.instance, "port", svc.Port, "interfaces", len(t.order))
	var at time.Duration
	for _, gap := range announceGaps {
		at += gap
		a.sched.after(at, a.Announce)
	}
	a.scheduleReannounce(at + a.reann)
	return a, nil
}

// newAdvertiser validates svc and prepares its records, without sockets.
func newAdvertiser(cfg Config, svc Service) (*Advertiser, error) {
	if svc.NodeID.IsZero() {
		return nil, fmt.Errorf("%w: no NodeID", ErrBadService)
	}
	if svc.Port == 0 {
		return nil, fmt.Errorf("%w: no port", ErrBadService)
	}
	ttl := svc.TTL
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < time.Second || ttl > 24*time.Hour {
		return nil, fmt.Errorf("%w: TTL %v outside 1s..24h", ErrBadService, ttl)
	}
	for _, a := range svc.Addrs {
		if !a.IsValid() || a.Is4In6() || a.IsUnspecified() {
			return nil, fmt.Errorf("%w: address %v", ErrBadService, a)
		}
	}
	txt := map[string]string{KeyNode: svc.NodeID.String(), KeyVersion: TXTVersion}
	if svc.Profile != "" {
		txt[KeyProfile] = svc.Profile
	}
	for k, v := range svc.TXT {
		if err := checkTXTKey(k); err != nil {
			return nil, err
		}
		if _, ours := txt[strings.ToLower(k)]; ours || strings.EqualFold(k, KeyProfile) {
			return nil, fmt.Errorf("%w: TXT key %q is reserved", ErrBadService, k)
		}
		txt[k] = v
	}
	label := svc.NodeID.String()
	a := &Advertiser{
		cfg:      cfg,
		log:      cfg.log(),
		svc:      svc,
		instance: label + "." + serviceName(),
		host:     label + "." + Domain + ".",
		ttl:      uint32(ttl / time.Second),
		txt:      formatTXT(txt),
		reann:    ttl / 2,
		sched:    newScheduler(cfg.Clock),
	}
	for _, s := range a.txt {
		if len(s) > 255 {
			return nil, fmt.Errorf("%w: TXT entry %.20q… longer than 255 bytes", ErrBadService, s)
		}
	}
	// Build one full announcement now so an oversized service fails here, not later.
	probe := &iface{Name: "probe", V4: []netip.Addr{netip.IPv4Unspecified()}}
	if _, err := a.announcement(probe, a.ttl).encode(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadService, err)
	}
	return a, nil
}

func checkTXTKey(k string) error {
	if k == "" {
		return fmt.Errorf("%w: empty TXT key", ErrBadService)
	}
	for _, c := range []byte(k) {
		if c < 0x20 || c > 0x7e || c == '=' {
			return fmt.Errorf("%w: TXT key %q must be printable ASCII without '='", ErrBadService, k)
		}
	}
	return nil
}

// scheduleReannounce keeps caches that never query (and late joiners that missed the
// start) fresh: an unsolicited announcement every half TTL.
func (a *Advertiser) scheduleReannounce(d time.Duration) {
	a.sched.after(d, func() {
		a.Announce()
		a.scheduleReannounce(a.reann)
	})
}

// Instance returns the full DNS-SD instance name.
func (a *Advertiser) Instance() string { return a.instance }

// Host returns the host name the SRV record points to.
func (a *Advertiser) Host() string { return a.host }

// Announce sends an unsolicited announcement on every interface now. The advertiser does
// this itself at start and every half TTL; call it after something outside changed.
func (a *Advertiser) Announce() {
	a.mu.Lock()
	closed := a.closed
	a.mu.Unlock()
	if closed {
		return
	}
	a.broadcast(a.ttl)
}

func (a *Advertiser) broadcast(ttl uint32) {
	for _, ifc := range a.t.order {
		b, err := a.announcement(ifc, ttl).encode()
		if err != nil {
			a.log.Warn("mdns: building announcement", "err", err)
			return
		}
		if err := a.t.multicast(b, ifc); err != nil {
			a.log.Debug("mdns: sending announcement", "interface", ifc.Name, "err", err)
		}
	}
}

// addrsOn returns the addresses advertised on ifc, without zones.
func (a *Advertiser) addrsOn(ifc *iface) []netip.Addr {
	if len(a.svc.Addrs) > 0 {
		return a.svc.Addrs
	}
	var out []netip.Addr
	for _, ad := range ifc.addrs() {
		out = append(out, ad.WithZone(""))
	}
	return out
}

// The records of the service, with the cache-flush bit on the unique ones (RFC 6762
// §10.2): the PTR is shared, everything else belongs to this node alone.
func (a *Advertiser) ptr(ttl uint32) record {
	return record{Name: serviceName(), Type: dnsmessage.TypePTR, TTL: ttl, Target: a.instance}
}

func (a *Advertiser) srv(ttl uint32) record {
	return record{Name: a.instance, Type: dnsmessage.TypeSRV, Flush: true, TTL: ttl, Target: a.host, Port: a.svc.Port}
}

func (a *Advertiser) txtRecord(ttl uint32) record {
	return record{Name: a.instance, Type: dnsmessage.TypeTXT, Flush: true, TTL: ttl, TXT: a.txt}
}

func (a *Advertiser) addrRecords(ifc *iface, ttl uint32, want dnsmessage.Type) []record {
	var out []record
	for _, ad := range a.addrsOn(ifc) {
		typ := dnsmessage.TypeAAAA
		if ad.Is4() {
			typ = dnsmessage.TypeA
		}
		if want != dnsmessage.TypeALL && want != typ {
			continue
		}
		out = append(out, record{Name: a.host, Type: typ, Flush: true, TTL: ttl, Addr: ad})
	}
	return out
}

// announcement is every record of the service as an unsolicited response on ifc; with
// ttl zero it is the goodbye (RFC 6762 §10.1).
func (a *Advertiser) announcement(ifc *iface, ttl uint32) *packet {
	pk := &packet{Response: true}
	pk.Answers = append(pk.Answers, a.ptr(ttl), a.srv(ttl), a.txtRecord(ttl))
	pk.Answers = append(pk.Answers, a.addrRecords(ifc, ttl, dnsmessage.TypeALL)...)
	return pk
}

// answer returns the records that answer q on ifc (answers) and those worth adding
// (extra), per RFC 6763 §12.
func (a *Advertiser) answer(q question, ifc *iface) (answers, extra []record) {
	any := q.Type == dnsmessage.TypeALL
	switch {
	case nameEqual(q.Name, serviceName()) && (any || q.Type == dnsmessage.TypePTR):
		answers = append(answers, a.ptr(a.ttl))
		extra = append(extra, a.srv(a.ttl), a.txtRecord(a.ttl))
		extra = append(extra, a.addrRecords(ifc, a.ttl, dnsmessage.TypeALL)...)
	case nameEqual(q.Name, enumName) && (any || q.Type == dnsmessage.TypePTR):
		answers = append(answers, record{Name: enumName, Type: dnsmessage.TypePTR, TTL: a.ttl, Target: serviceName()})
	case nameEqual(q.Name, a.instance):
		if any || q.Type == dnsmessage.TypeSRV {
			answers = append(answers, a.srv(a.ttl))
			extra = append(extra, a.addrRecords(ifc, a.ttl, dnsmessage.TypeALL)...)
		}
		if any || q.Type == dnsmessage.TypeTXT {
			answers = append(answers, a.txtRecord(a.ttl))
		}
	case nameEqual(q.Name, a.host):
		answers = append(answers, a.addrRecords(ifc, a.ttl, q.Type)...)
		if !any {
			// RFC 6762 §6.2: the other family's addresses go along as additional records.
			other := dnsmessage.TypeA
			if q.Type == dnsmessage.TypeA {
				other = dnsmessage.TypeAAAA
			}
			extra = append(extra, a.addrRecords(ifc, a.ttl, other)...)
		}
	}
	return answers, extra
}

// sameData reports whether two records carry the same name, type and data.
func sameData(x, y record) bool {
	if x.Type != y.Type || !nameEqual(x.Name, y.Name) {
		return false
	}
	switch x.Type {
	case dnsmessage.TypePTR:
		return nameEqual(x.Target, y.Target)
	case dnsmessage.TypeSRV:
		return nameEqual(x.Target, y.Target) && x.Port == y.Port
	case dnsmessage.TypeTXT:
		return strings.Join(x.TXT, "\x00") == strings.Join(y.TXT, "\x00")
	case dnsmessage.TypeA, dnsmessage.TypeAAAA:
		return x.Addr.WithZone("") == y.Addr.WithZone("")
	}
	return false
}

func containsRecord(list []record, r record) bool {
	for _, x := range list {
		if sameData(x, r) {
			return true
		}
	}
	return false
}

// respond builds the answer to a query; nil when the query asks nothing of ours.
func (a *Advertiser) respond(pk *packet, ifc *iface, legacy bool) (resp *packet, unicast, shared bool) {
	resp = &packet{Response: true}
	allQU := true
	for _, q := range pk.Questions {
		ans, extra := a.answer(q, ifc)
		if len(ans) == 0 {
			continue
		}
		allQU = allQU && q.Unicast
		for _, r := range ans {
			// Known-answer suppression (RFC 6762 §7.1): the querier already holds the
			// record with at least half its lifetime left.
			known := false
			for _, k := range pk.Answers {
				if sameData(k, r) && k.TTL >= r.TTL/2 {
					known = true
				}
			}
			if !known && !containsRecord(resp.Answers, r) {
				resp.Answers = append(resp.Answers, r)
				shared = shared || r.Type == dnsmessage.TypePTR
			}
		}
		for _, r := range extra {
			if !containsRecord(resp.Extra, r) {
				resp.Extra = append(resp.Extra, r)
			}
		}
	}
	if len(resp.Answers) == 0 {
		return nil, false, false
	}
	extra := resp.Extra[:0]
	for _, r := range resp.Extra {
		if !containsRecord(resp.Answers, r) && !containsRecord(pk.Answers, r) {
			extra = append(extra, r)
		}
	}
	resp.Extra = extra
	if legacy {
		// RFC 6762 §6.7: a legacy resolver gets a conventional DNS reply: its ID, its
		// questions, no cache-flush bits and short TTLs.
		resp.ID = pk.ID
		for _, q := range pk.Questions {
			q.Unicast = false
			resp.Questions = append(resp.Questions, q)
		}
		for _, l := range []*[]record{&resp.Answers, &resp.Extra} {
			for i := range *l {
				(*l)[i].Flush = false
				(*l)[i].TTL = min((*l)[i].TTL, legacyTTL)
			}
		}
		return resp, true, false
	}
	return resp, allQU, shared
}

func (a *Advertiser) handle(pk *packet, src netip.AddrPort, ifc *iface) {
	if pk.Response || len(pk.Questions) == 0 {
		return
	}
	a.mu.Lock()
	closed := a.closed
	a.mu.Unlock()
	if closed {
		return
	}
	legacy := src.Port() != GroupV4.Port()
	resp, unicast, shared := a.respond(pk, ifc, legacy)
	if resp == nil {
		return
	}
	b, err := resp.encode()
	if err != nil {
		a.log.Warn("mdns: building response", "err", err)
		return
	}
	send := func() {
		var err error
		if unicast {
			err = a.t.sendTo(b, ifc, src)
		} else {
			err = a.t.multicast(b, ifc)
		}
		if err != nil {
			a.log.Debug("mdns: sending response", "to", src, "interface", ifc.Name, "err", err)
		}
	}
	if shared && !unicast {
		// RFC 6762 §6: answers from a shared record set are delayed 20-120 ms so that
		// many responders on one link do not answer in the same instant.
		a.sched.after(jitter(20*time.Millisecond, 120*time.Millisecond), send)
		return
	}
	send()
}

// Close sends a goodbye (every record with TTL zero) on every interface, stops
// answering and waits for the advertiser's goroutines. It is idempotent.
func (a *Advertiser) Close() error {
	a.closeOnce.Do(func() {
		a.mu.Lock()
		a.closed = true
		a.mu.Unlock()
		a.sched.close()
		a.broadcast(0)
		a.t.close()
		a.log.Debug("mdns: advertiser closed", "instance", a.instance)
	})
	return nil
}
