// Package party is the model of party networks: named groups of nodes, each member with
// a stable virtual IPv4 and IPv6 address, and the signed invites that let nodes join.
package party

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"peerlink/identity"
)

// Errors. The rendezvous protocol carries each as its own code, so a client gets errors
// that match these with errors.Is.
var (
	ErrBadName         = errors.New("party: bad party name")
	ErrPartyFull       = errors.New("party: party is full")
	ErrInviteMalformed = errors.New("party: malformed invite")
	ErrInviteForged    = errors.New("party: invite is not genuine")
	ErrInviteExpired   = errors.New("party: invite expired")
	ErrNoParty         = errors.New("party: no such party")
	ErrPartyExists     = errors.New("party: party already exists")
	ErrNotMember       = errors.New("party: not a member")
	ErrNotOwner        = errors.New("party: not the owner")
	ErrNotShared       = errors.New("party: the two nodes share no party")
)

// MaxNameLen is the longest party name.
const MaxNameLen = 32

// MaxMembers is how many members a party can have: one per host address .1 to .254 of
// its /24.
const MaxMembers = 254

// CGNAT is the range party IPv4 subnets come from: RFC 6598's shared address space, which
// no public host uses and home networks rarely do.
var CGNAT = netip.MustParsePrefix("100.64.0.0/10")

// ula is the RFC 4193 locally assigned half of fc00::/7.
var ula = netip.MustParsePrefix("fd00::/8")

// Member is one node of a party.
type Member struct {
	NodeID   identity.NodeID `json:"nodeID"`
	IPv4     netip.Addr      `json:"ipv4"`
	IPv6     netip.Addr      `json:"ipv6"`
	Joined   time.Time       `json:"joined"`
	Online   bool            `json:"online,omitempty"`  // filled in by the server when listing
	LastSeen time.Time       `json:"lastSeen,omitzero"` // idem
}

// Party is a named group of nodes on one virtual LAN.
type Party struct {
	Name    string          `json:"name"`
	Owner   identity.NodeID `json:"owner"`
	Created time.Time       `json:"created"`
	Prefix4 netip.Prefix    `json:"prefix4"` // a /24 inside 100.64.0.0/10
	Prefix6 netip.Prefix    `json:"prefix6"` // a /64 ULA (fd00::/8, 40-bit global ID from a hash of the name, RFC 4193)
	Members []Member        `json:"members"`
}

// ValidName checks a party name: 1 to 32 of a-z 0-9 . _ -, starting and ending with a
// letter or digit, with no "..". The ends and the dots are restricted because names are
// keys of the servers' key-value store (NATS subjects, where "." separates tokens).
func ValidName(s string) error {
	if len(s) == 0 || len(s) > MaxNameLen {
		return fmt.Errorf("%w: %.40q must be 1 to %d characters", ErrBadName, s, MaxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && c != '.' && c != '_' && c != '-' {
			return fmt.Errorf("%w: %.40q: only a-z 0-9 . _ - are allowed", ErrBadName, s)
		}
		if !alnum && (i == 0 || i == len(s)-1) {
			return fmt.Errorf("%w: %.40q must start and end with a letter or digit", ErrBadName, s)
		}
		if c == '.' && s[i-1] == '.' {
			return fmt.Errorf("%w: %.40q has \"..\"", ErrBadName, s)
		}
	}
	return nil
}

// subnets is how many /24s CGNAT holds.
const subnets = 1 << (24 - 10)

// prefix4At returns the i-th /24 of CGNAT.
func prefix4At(i uint32) netip.Prefix {
	base := CGNAT.Addr().As4()
	v := binary.BigEndian.Uint32(base[:]) + (i%subnets)<<8
	var a [4]byte
	binary.BigEndian.PutUint32(a[:], v)
	return netip.PrefixFrom(netip.AddrFrom4(a), 24)
}

// prefix6For returns the party's ULA /64: fd, a 40-bit global ID from a hash of the name,
// subnet ID 0. RFC 4193 picks the global ID at random; a hash gives every server the same
// answer without coordination, and 40 bits keep collisions as unlikely.
func prefix6For(name string) netip.Prefix {
	h := sha256.Sum256([]byte("peerlink/party/v1 ula\n" + name))
	var a [16]byte
	a[0] = 0xfd
	copy(a[1:6], h[:5])
	return netip.PrefixFrom(netip.AddrFrom16(a), 64)
}

// New makes a party owned by owner, its first member. Its IPv4 subnet is the /24 of
// 100.64.0.0/10 the name hashes to, or the next one after it that taken (other parties'
// subnets) does not claim; nil taken claims none.
func New(name string, owner identity.NodeID, now time.Time, taken func(netip.Prefix) bool) (*Party, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	if owner.IsZero() {
		return nil, fmt.Errorf("party: %s: no owner", name)
	}
	h := sha256.Sum256([]byte("peerlink/party/v1 ipv4\n" + name))
	start := binary.BigEndian.Uint32(h[:4]) % subnets
	p := &Party{Name: name, Owner: owner, Created: now.UTC(), Prefix6: prefix6For(name)}
	for i := range uint32(subnets) {
		cand := prefix4At(start + i)
		if taken == nil || !taken(cand) {
			p.Prefix4 = cand
			break
		}
	}
	if !p.Prefix4.IsValid() {
		return nil, fmt.Errorf("party: %s: every /24 of %v is taken", name, CGNAT)
	}
	if _, err := p.Add(owner, now); err != nil {
		return nil, err
	}
	return p, nil
}

// Member returns the member with id.
func (p *Party) Member(id identity.NodeID) (Member, bool) {
	for _, m := range p.Members {
		if m.NodeID == id {
			return m, true
		}
	}
	return Member{}, false
}

// hostAddrs returns host number n (1–254) of the party's two prefixes.
func (p *Party) hostAddrs(n byte) (netip.Addr, netip.Addr) {
	a4 := p.Prefix4.Masked().Addr().As4()
	a4[3] = n
	a6 := p.Prefix6.Masked().Addr().As16()
	a6[15] = n
	return netip.AddrFrom4(a4), netip.AddrFrom16(a6)
}

// Add makes id a member with the lowest free host address (.1 to .254; the IPv6 address
// ends in the same number). Adding a member again returns it unchanged, so its addresses
// stay those it had.
func (p *Party) Add(id identity.NodeID, now time.Time) (Member, error) {
	if m, ok := p.Member(id); ok {
		return m, nil
	}
	var used [256]bool
	for _, m := range p.Members {
		if m.IPv4.Is4() {
			used[m.IPv4.As4()[3]] = true
		}
	}
	for n := 1; n <= MaxMembers; n++ {
		if used[n] {
			continue
		}
		v4, v6 := p.hostAddrs(byte(n))
		m := Member{NodeID: id, IPv4: v4, IPv6: v6, Joined: now.UTC()}
		p.Members = append(p.Members, m)
		return m, nil
	}
	return Member{}, fmt.Errorf("%w: %s has %d members", ErrPartyFull, p.Name, len(p.Members))
}

// Remove drops member id and reports whether it was one. When the owner leaves, the
// member who joined first after it becomes the owner; the others keep their addresses.
func (p *Party) Remove(id identity.NodeID) bool {
	i := slices.IndexFunc(p.Members, func(m Member) bool { return m.NodeID == id })
	if i < 0 {
		return false
	}
	p.Members = slices.Delete(p.Members, i, i+1)
	if p.Owner == id && len(p.Members) > 0 {
		oldest := p.Members[0]
		for _, m := range p.Members[1:] {
			if m.Joined.Before(oldest.Joined) {
				oldest = m
			}
		}
		p.Owner = oldest.NodeID
	}
	return true
}

// Validate checks a decoded party: its name, prefixes in range, members' addresses in
// them (host numbers 1–254, the same in both), no duplicate members or addresses, and an
// owner who is a member. A party with no members passes: it is the mark a party leaves
// while it is being deleted.
func (p *Party) Validate() error {
	if err := ValidName(p.Name); err != nil {
		return err
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("party: %s: "+format, append([]any{p.Name}, args...)...)
	}
	if !p.Prefix4.IsValid() || p.Prefix4.Bits() != 24 || !p.Prefix4.Addr().Is4() || p.Prefix4.Masked() != p.Prefix4 || !CGNAT.Contains(p.Prefix4.Addr()) {
		return bad("IPv4 prefix %v is not a /24 of %v", p.Prefix4, CGNAT)
	}
	if !p.Prefix6.IsValid() || p.Prefix6.Bits() != 64 || !p.Prefix6.Addr().Is6() || p.Prefix6.Masked() != p.Prefix6 || !ula.Contains(p.Prefix6.Addr()) {
		return bad("IPv6 prefix %v is not a /64 of %v", p.Prefix6, ula)
	}
	if len(p.Members) > MaxMembers {
		return bad("%d members, at most %d", len(p.Members), MaxMembers)
	}
	if p.Owner.IsZero() {
		return bad("no owner")
	}
	if len(p.Members) > 0 {
		if _, ok := p.Member(p.Owner); !ok {
			return bad("owner %s is not a member", p.Owner.Short())
		}
	}
	var hosts [256]bool
	ids := make(map[identity.NodeID]bool, len(p.Members))
	for _, m := range p.Members {
		if m.NodeID.IsZero() {
			return bad("member without a NodeID")
		}
		if ids[m.NodeID] {
			return bad("%s is a member twice", m.NodeID.Short())
		}
		ids[m.NodeID] = true
		if !m.IPv4.Is4() || !p.Prefix4.Contains(m.IPv4) {
			return bad("member %s's IPv4 %v is not in %v", m.NodeID.Short(), m.IPv4, p.Prefix4)
		}
		n := m.IPv4.As4()[3]
		if n == 0 || n == 255 {
			return bad("member %s has the network or broadcast address %v", m.NodeID.Short(), m.IPv4)
		}
		if hosts[n] {
			return bad("address %v is given twice", m.IPv4)
		}
		hosts[n] = true
		if _, v6 := p.hostAddrs(n); m.IPv6 != v6 {
			return bad("member %s's IPv6 %v is not %v", m.NodeID.Short(), m.IPv6, v6)
		}
	}
	return nil
}
