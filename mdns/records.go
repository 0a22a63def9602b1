package mdns

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// maxPacket is the largest mDNS message accepted or built: RFC 6762 §17 allows up to
// 9000 bytes on the wire; packets we build stay far below the 1500-byte Ethernet MTU.
const maxPacket = 9000

// topBit is the class field's mDNS bit: cache-flush in records, unicast-response in
// questions (RFC 6762 §10.2 and §5.4).
const topBit = 1 << 15

// question is a parsed question.
type question struct {
	Name    string
	Type    dnsmessage.Type
	Unicast bool // QU: the querier asks for a unicast reply
}

// record is a parsed or to-be-built resource record of a type this package uses.
type record struct {
	Name  string
	Type  dnsmessage.Type
	Flush bool // cache-flush: this record set replaces what caches hold for the name
	TTL   uint32

	Target string     // PTR and SRV
	Port   uint16     // SRV
	TXT    []string   // TXT
	Addr   netip.Addr // A and AAAA
	prio   [2]uint16  // SRV priority and weight, kept for round trips
}

// packet is a parsed mDNS message with the records of the types this package uses;
// others are skipped.
type packet struct {
	ID        uint16
	Response  bool
	Questions []question
	// Answers holds a query's known answers or a response's answer section.
	Answers []record
	// Extra holds authority and additional records.
	Extra []record
}

// parsePacket parses an mDNS message. It never panics; errors wrap ErrMalformed.
func parsePacket(b []byte) (*packet, error) {
	if len(b) > maxPacket {
		return nil, fmt.Errorf("%w: %d bytes", ErrMalformed, len(b))
	}
	var p dnsmessage.Parser
	h, err := p.Start(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	// RFC 6762 §18.3 and §18.11: messages with an opcode or rcode other than zero are
	// silently ignored.
	if h.OpCode != 0 || h.RCode != 0 {
		return nil, fmt.Errorf("%w: opcode %d rcode %d", ErrMalformed, h.OpCode, h.RCode)
	}
	pk := &packet{ID: h.ID, Response: h.Response}
	for {
		q, err := p.Question()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: question: %v", ErrMalformed, err)
		}
		pk.Questions = append(pk.Questions, question{
			Name:    q.Name.String(),
			Type:    q.Type,
			Unicast: q.Class&topBit != 0,
		})
	}
	sections := []struct {
		header func() (dnsmessage.ResourceHeader, error)
		skip   func() error
		into   *[]record
	}{
		{p.AnswerHeader, p.SkipAnswer, &pk.Answers},
		{p.AuthorityHeader, p.SkipAuthority, &pk.Extra},
		{p.AdditionalHeader, p.SkipAdditional, &pk.Extra},
	}
	for _, s := range sections {
		for {
			h, err := s.header()
			if errors.Is(err, dnsmessage.ErrSectionDone) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("%w: record header: %v", ErrMalformed, err)
			}
			r := record{Name: h.Name.String(), Type: h.Type, Flush: h.Class&topBit != 0, TTL: h.TTL}
			if h.Class&^topBit != dnsmessage.ClassINET {
				if err := s.skip(); err != nil {
					return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
				}
				continue
			}
			switch h.Type {
			case dnsmessage.TypePTR:
				rr, err := p.PTRResource()
				if err != nil {
					return nil, fmt.Errorf("%w: PTR: %v", ErrMalformed, err)
				}
				r.Target = rr.PTR.String()
			case dnsmessage.TypeSRV:
				rr, err := p.SRVResource()
				if err != nil {
					return nil, fmt.Errorf("%w: SRV: %v", ErrMalformed, err)
				}
				r.Target, r.Port, r.prio = rr.Target.String(), rr.Port, [2]uint16{rr.Priority, rr.Weight}
			case dnsmessage.TypeTXT:
				rr, err := p.TXTResource()
				if err != nil {
					return nil, fmt.Errorf("%w: TXT: %v", ErrMalformed, err)
				}
				r.TXT = rr.TXT
			case dnsmessage.TypeA:
				rr, err := p.AResource()
				if err != nil {
					return nil, fmt.Errorf("%w: A: %v", ErrMalformed, err)
				}
				r.Addr = netip.AddrFrom4(rr.A)
			case dnsmessage.TypeAAAA:
				rr, err := p.AAAAResource()
				if err != nil {
					return nil, fmt.Errorf("%w: AAAA: %v", ErrMalformed, err)
				}
				r.Addr = netip.AddrFrom16(rr.AAAA)
			default:
				if err := s.skip(); err != nil {
					return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
				}
				continue
			}
			*s.into = append(*s.into, r)
		}
	}
	return pk, nil
}

// encode builds the wire form of pk with name compression.
func (pk *packet) encode() ([]byte, error) {
	h := dnsmessage.Header{ID: pk.ID, Response: pk.Response, Authoritative: pk.Response}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), h)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	for _, q := range pk.Questions {
		n, err := dnsmessage.NewName(q.Name)
		if err != nil {
			return nil, err
		}
		class := dnsmessage.ClassINET
		if q.Unicast {
			class |= topBit
		}
		if err := b.Question(dnsmessage.Question{Name: n, Type: q.Type, Class: class}); err != nil {
			return nil, err
		}
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	for _, r := range pk.Answers {
		if err := addRecord(&b, r); err != nil {
			return nil, err
		}
	}
	if err := b.StartAdditionals(); err != nil {
		return nil, err
	}
	for _, r := range pk.Extra {
		if err := addRecord(&b, r); err != nil {
			return nil, err
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil, err
	}
	if len(out) > maxPacket {
		return nil, fmt.Errorf("mdns: message of %d bytes too long", len(out))
	}
	return out, nil
}

func addRecord(b *dnsmessage.Builder, r record) error {
	n, err := dnsmessage.NewName(r.Name)
	if err != nil {
		return err
	}
	class := dnsmessage.ClassINET
	if r.Flush {
		class |= topBit
	}
	h := dnsmessage.ResourceHeader{Name: n, Type: r.Type, Class: class, TTL: r.TTL}
	switch r.Type {
	case dnsmessage.TypePTR:
		t, err := dnsmessage.NewName(r.Target)
		if err != nil {
			return err
		}
		return b.PTRResource(h, dnsmessage.PTRResource{PTR: t})
	case dnsmessage.TypeSRV:
		t, err := dnsmessage.NewName(r.Target)
		if err != nil {
			return err
		}
		return b.SRVResource(h, dnsmessage.SRVResource{Priority: r.prio[0], Weight: r.prio[1], Port: r.Port, Target: t})
	case dnsmessage.TypeTXT:
		txt := r.TXT
		if len(txt) == 0 {
			// RFC 6763 §6.1: an empty TXT record holds one empty string.
			txt = []string{""}
		}
		return b.TXTResource(h, dnsmessage.TXTResource{TXT: txt})
	case dnsmessage.TypeA:
		if !r.Addr.Is4() {
			return fmt.Errorf("mdns: A record with %v", r.Addr)
		}
		return b.AResource(h, dnsmessage.AResource{A: r.Addr.As4()})
	case dnsmessage.TypeAAAA:
		if !r.Addr.Is6() || r.Addr.Is4In6() {
			return fmt.Errorf("mdns: AAAA record with %v", r.Addr)
		}
		return b.AAAAResource(h, dnsmessage.AAAAResource{AAAA: r.Addr.As16()})
	}
	return fmt.Errorf("mdns: cannot build %v records", r.Type)
}

// nameEqual compares DNS names, which are case-insensitive (RFC 6762 §16 for ASCII).
func nameEqual(a, b string) bool { return strings.EqualFold(a, b) }

// serviceName is the fully qualified service type, "_peerlink._udp.local.".
func serviceName() string { return ServiceType + "." + Domain + "." }

// enumName is the DNS-SD service type enumeration name (RFC 6763 §9).
const enumName = "_services._dns-sd._udp.local."

// parseTXT splits TXT strings into key/value pairs (RFC 6763 §6.3-§6.4): keys are
// case-insensitive and the first occurrence wins; strings without a key are ignored.
func parseTXT(txt []string) map[string]string {
	m := make(map[string]string, len(txt))
	for _, s := range txt {
		k, v, _ := strings.Cut(s, "=")
		if k == "" {
			continue
		}
		k = strings.ToLower(k)
		if _, dup := m[k]; dup {
			continue
		}
		m[k] = v
	}
	return m
}

// formatTXT writes key/value pairs in a stable order, the keys peerlink defines first.
func formatTXT(m map[string]string) []string {
	first := []string{KeyNode, KeyVersion, KeyProfile}
	var out []string
	for _, k := range first {
		if v, ok := m[k]; ok {
			out = append(out, k+"="+v)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if slices.Contains(first, k) {
			continue
		}
		out = append(out, k+"="+m[k])
	}
	return out
}

// firstLabel returns the first label of a name and the rest.
func firstLabel(name string) (label, rest string) {
	l, r, _ := strings.Cut(name, ".")
	return l, r
}
