package signal

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"

	"peerlink/identity"
	"peerlink/party"
	"peerlink/store"
)

// MembershipCacheTTL is how long a server trusts what it read of a node's parties. A
// kick or a leave on any server therefore stops the node reaching former fellow members
// through every server within this time.
const MembershipCacheTTL = 2 * time.Second

// maxCacheEntries bounds the membership cache; past it, expired entries are dropped, and
// if that is not enough, all of them.
const maxCacheEntries = 1 << 17

// casAttempts bounds the read-modify-Update retries of one party change (the store
// timeout bounds them too). A conflict means another server changed the party meanwhile,
// and one of the contenders always wins, so even all 254 members joining at once finish.
const casAttempts = 1000

// partyRefresh is how often a server rewrites a party its members connect to, so that a
// party in use outlives the store's TTL for parties (30 days by default).
const partyRefresh = 24 * time.Hour

type memberEntry struct {
	names []string
	at    time.Time
}

// memberCache holds nodes' party lists for MembershipCacheTTL, so checking whether two
// nodes share a party costs two map reads on the routing path.
type memberCache struct {
	mu sync.Mutex
	m  map[identity.NodeID]memberEntry

	refreshMu sync.Mutex
	refreshed map[string]time.Time // party name: when this server last rewrote it
}

func (s *Server) cachedMemberships(id identity.NodeID) ([]string, bool) {
	now := s.clock.Now()
	s.members.mu.Lock()
	defer s.members.mu.Unlock()
	e, ok := s.members.m[id]
	if !ok || now.Sub(e.at) >= MembershipCacheTTL || now.Before(e.at) {
		return nil, false
	}
	return e.names, true
}

func (s *Server) cacheMemberships(id identity.NodeID, names []string, at time.Time) {
	s.members.mu.Lock()
	defer s.members.mu.Unlock()
	if s.members.m == nil {
		s.members.m = make(map[identity.NodeID]memberEntry)
	}
	if len(s.members.m) >= maxCacheEntries {
		now := s.clock.Now()
		for k, e := range s.members.m {
			if now.Sub(e.at) >= MembershipCacheTTL {
				delete(s.members.m, k)
			}
		}
		if len(s.members.m) >= maxCacheEntries {
			clear(s.members.m)
		}
	}
	s.members.m[id] = memberEntry{names: names, at: at}
}

// forgetMemberships drops id's cached parties after this server changed them.
func (s *Server) forgetMemberships(id identity.NodeID) {
	s.members.mu.Lock()
	delete(s.members.m, id)
	s.members.mu.Unlock()
}

// readMemberships reads id's party names from the store (nil when it has none).
func (s *Server) readMemberships(ctx context.Context, id identity.NodeID) ([]string, uint64, error) {
	v, rev, err := s.store.GetRev(ctx, store.Memberships, id.String())
	if errors.Is(err, store.ErrNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, err
	}
	var names []string
	if err := json.Unmarshal(v, &names); err != nil {
		return nil, 0, fmt.Errorf("membership record of %s: %w", id.Short(), err)
	}
	return names, rev, nil
}

// memberships returns id's parties, from the cache when it is fresh enough.
func (s *Server) memberships(ctx context.Context, id identity.NodeID) ([]string, error) {
	if names, ok := s.cachedMemberships(id); ok {
		return names, nil
	}
	at := s.clock.Now()
	names, _, err := s.readMemberships(ctx, id)
	if err != nil {
		return nil, err
	}
	s.cacheMemberships(id, names, at)
	return names, nil
}

// checkShared decides whether a may discover or signal b: always when neither is in any
// party (nodes that use no parties work as they did before parties existed), otherwise
// only when they share one.
func (s *Server) checkShared(a, b identity.NodeID) *Error {
	if a == b {
		return nil
	}
	// The routing path: both lists cached, no context, no allocation.
	la, okA := s.cachedMemberships(a)
	lb, okB := s.cachedMemberships(b)
	if !okA || !okB {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StoreTimeout)
		defer cancel()
		var err error
		if !okA {
			if la, err = s.memberships(ctx, a); err != nil {
				s.log.Warn("membership check failed", "node", a.Short(), "err", err)
				return errorf(CodeInternal, "store unavailable")
			}
		}
		if !okB {
			if lb, err = s.memberships(ctx, b); err != nil {
				s.log.Warn("membership check failed", "node", b.Short(), "err", err)
				return errorf(CodeInternal, "store unavailable")
			}
		}
	}
	if len(la) == 0 && len(lb) == 0 {
		return nil
	}
	for _, n := range la {
		if slices.Contains(lb, n) {
			return nil
		}
	}
	return &Error{Code: CodeNotShared, Message: fmt.Sprintf("%v: %s is in no party with %s", party.ErrNotShared, b.Short(), a.Short())}
}

// retry waits a little before another compare-and-swap attempt; the jitter keeps servers
// that collided from colliding again.
func retry(ctx context.Context, attempt int) error {
	d := time.Duration(rand.Int64N(int64(min(attempt+1, 10)) * int64(2*time.Millisecond)))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// changeMemberships applies change to id's party list with compare-and-swap.
func (s *Server) changeMemberships(ctx context.Context, id identity.NodeID, change func([]string) []string) error {
	defer s.forgetMemberships(id)
	for attempt := 0; ; attempt++ {
		names, rev, err := s.readMemberships(ctx, id)
		if err != nil {
			return err
		}
		next := change(slices.Clone(names))
		if slices.Equal(next, names) && rev != 0 {
			return nil
		}
		if next == nil {
			next = []string{}
		}
		b, _ := json.Marshal(next)
		err = s.store.Update(ctx, store.Memberships, id.String(), b, rev)
		if err == nil || !errors.Is(err, store.ErrConflict) || attempt >= casAttempts {
			return err
		}
		if err := retry(ctx, attempt); err != nil {
			return err
		}
	}
}

func (s *Server) addMembership(ctx context.Context, id identity.NodeID, name string) error {
	return s.changeMemberships(ctx, id, func(names []string) []string {
		if !slices.Contains(names, name) {
			names = append(names, name)
		}
		return names
	})
}

func (s *Server) removeMembership(ctx context.Context, id identity.NodeID, name string) error {
	return s.changeMemberships(ctx, id, func(names []string) []string {
		return slices.DeleteFunc(names, func(n string) bool { return n == name })
	})
}

// loadParty reads a party. A party with no members is one being deleted: no party.
func (s *Server) loadParty(ctx context.Context, name string) (*party.Party, uint64, error) {
	v, rev, err := s.store.GetRev(ctx, store.Parties, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, 0, fmt.Errorf("%w: there is no party %s", party.ErrNoParty, name)
	}
	if err != nil {
		return nil, 0, err
	}
	p := new(party.Party)
	if err := json.Unmarshal(v, p); err != nil {
		return nil, 0, fmt.Errorf("stored party %s: %w", name, err)
	}
	if err := p.Validate(); err != nil {
		return nil, 0, fmt.Errorf("stored party %s: %w", name, err)
	}
	if p.Name != name {
		return nil, 0, fmt.Errorf("stored party %s is named %s", name, p.Name)
	}
	if len(p.Members) == 0 {
		return nil, 0, fmt.Errorf("%w: there is no party %s", party.ErrNoParty, name)
	}
	return p, rev, nil
}

// changeParty applies change to a party with compare-and-swap, retrying on conflicts.
// change reports whether it changed anything. A party left with no members is written
// so (which stops concurrent joins, since no inviter is a member any more) and then
// deleted.
func (s *Server) changeParty(ctx context.Context, name string, change func(p *party.Party) (bool, error)) (*party.Party, error) {
	for attempt := 0; ; attempt++ {
		p, rev, err := s.loadParty(ctx, name)
		if err != nil {
			return nil, err
		}
		changed, err := change(p)
		if err != nil || !changed {
			return p, err
		}
		b, err := json.Marshal(p)
		if err != nil {
			return nil, err
		}
		err = s.store.Update(ctx, store.Parties, name, b, rev)
		if err == nil {
			if len(p.Members) == 0 {
				err = s.store.Delete(ctx, store.Parties, name)
			}
			return p, err
		}
		if !errors.Is(err, store.ErrConflict) || attempt >= casAttempts {
			return nil, err
		}
		if err := retry(ctx, attempt); err != nil {
			return nil, err
		}
	}
}

// fillStatus sets the members' Online and LastSeen.
func (s *Server) fillStatus(ctx context.Context, p *party.Party) {
	for i := range p.Members {
		m := &p.Members[i]
		s.mu.Lock()
		m.Online = s.conns[m.NodeID] != nil
		s.mu.Unlock()
		if !m.Online {
			on, err := s.store.Online(ctx, m.NodeID.String())
			m.Online = err == nil && on
		}
		if v, err := s.store.Get(ctx, store.Presence, m.NodeID.String()); err == nil {
			var rec presenceRecord
			if json.Unmarshal(v, &rec) == nil && rec.LastSeen > 0 {
				m.LastSeen = time.UnixMilli(rec.LastSeen).UTC()
			}
		}
	}
}

// partyFail answers a party request that failed: party's errors with their codes,
// anything else as a store fault.
func (c *conn) partyFail(id uint64, err error) {
	if e, ok := partyError(err); ok {
		c.replyError(id, e)
		return
	}
	var pe *Error
	if errors.As(err, &pe) {
		c.replyError(id, pe)
		return
	}
	c.s.log.Warn("party request failed", "node", c.id.Short(), "err", err)
	c.replyError(id, errorf(CodeInternal, "store unavailable"))
}

// roomForParty fails when c's node is already in the server's maximum of parties.
func (c *conn) roomForParty(ctx context.Context, name string) error {
	names, _, err := c.s.readMemberships(ctx, c.id)
	if err != nil {
		return err
	}
	if len(names) >= c.s.cfg.MaxParties && !slices.Contains(names, name) {
		return errorf(CodeTooManyParties, "%s is in %d parties, the most this server allows", c.id.Short(), len(names))
	}
	return nil
}

func (c *conn) sendParty(ctx context.Context, id uint64, p *party.Party) {
	c.s.fillStatus(ctx, p)
	c.send(c.frame(id, TypeParty, p))
}

// partyBody decodes a party request's body, answering a malformed one.
func partyBody[T any](c *conn, f Frame) (T, bool) {
	var b T
	if err := json.Unmarshal(f.Body, &b); err != nil {
		c.reject(f.ID, errorf(CodeMalformed, "%s: %v", f.Type, err))
		return b, false
	}
	return b, true
}

func (c *conn) partyRequest(f Frame) {
	ctx, cancel := c.storeCtx()
	defer cancel()
	var p *party.Party // the answer to create, join and get; the others answer ok
	var err error
	switch f.Type {
	case TypePartyCreate:
		b, ok := partyBody[partyNameBody](c, f)
		if !ok {
			return
		}
		p, err = c.createParty(ctx, b.Name)

	case TypePartyJoin:
		b, ok := partyBody[partyJoinBody](c, f)
		if !ok {
			return
		}
		p, err = c.joinParty(ctx, b.Invite)

	case TypePartyLeave:
		b, ok := partyBody[partyNameBody](c, f)
		if !ok {
			return
		}
		err = c.leaveParty(ctx, b.Name)

	case TypePartyKick:
		b, ok := partyBody[partyKickBody](c, f)
		if !ok {
			return
		}
		node, perr := identity.ParseNodeID(b.NodeID)
		if perr != nil {
			c.reject(f.ID, errorf(CodeMalformed, "%s: %v", f.Type, perr))
			return
		}
		if err = party.ValidName(b.Name); err == nil {
			if node == c.id {
				c.reject(f.ID, errorf(CodeInvalid, "the owner cannot kick itself: leave the party instead"))
				return
			}
			err = c.kickFromParty(ctx, b.Name, node)
		}

	case TypePartyGet:
		b, ok := partyBody[partyNameBody](c, f)
		if !ok {
			return
		}
		p, err = c.getParty(ctx, b.Name)

	case TypePartyList:
		var names []string
		if names, _, err = c.s.readMemberships(ctx, c.id); err == nil {
			slices.Sort(names)
			c.send(c.frame(f.ID, TypeParties, partiesBody{Names: append([]string{}, names...)}))
			return
		}
	}
	switch {
	case err != nil:
		c.partyFail(f.ID, err)
	case p != nil:
		c.sendParty(ctx, f.ID, p)
	default:
		c.send(AppendFrame(nil, f.ID, TypeOK, []byte("{}")))
	}
}

// leaveParty takes c's node out of a party, and the party out of its membership list.
func (c *conn) leaveParty(ctx context.Context, name string) error {
	if err := party.ValidName(name); err != nil {
		return err
	}
	s := c.s
	_, err := s.changeParty(ctx, name, func(p *party.Party) (bool, error) {
		if !p.Remove(c.id) {
			return false, fmt.Errorf("%w: you are not a member of party %s", party.ErrNotMember, name)
		}
		return true, nil
	})
	// The index follows the party, and also loses names of parties that are gone.
	if err == nil || errors.Is(err, party.ErrNoParty) || errors.Is(err, party.ErrNotMember) {
		if ierr := s.removeMembership(ctx, c.id, name); ierr != nil && err == nil {
			err = ierr
		}
	}
	return err
}

// kickFromParty removes node from a party c's node owns.
func (c *conn) kickFromParty(ctx context.Context, name string, node identity.NodeID) error {
	_, err := c.s.changeParty(ctx, name, func(p *party.Party) (bool, error) {
		if _, ok := p.Member(c.id); !ok {
			return false, fmt.Errorf("%w: you are not a member of party %s", party.ErrNotMember, name)
		}
		if p.Owner != c.id {
			return false, fmt.Errorf("%w: only the owner of party %s (%s) can remove members", party.ErrNotOwner, name, p.Owner.Short())
		}
		if !p.Remove(node) {
			return false, fmt.Errorf("%w: %s is not a member of party %s", party.ErrNotMember, node.Short(), name)
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	return c.s.removeMembership(ctx, node, name)
}

// getParty returns a party to one of its members.
func (c *conn) getParty(ctx context.Context, name string) (*party.Party, error) {
	if err := party.ValidName(name); err != nil {
		return nil, err
	}
	p, _, err := c.s.loadParty(ctx, name)
	if err != nil {
		return nil, err
	}
	if _, ok := p.Member(c.id); !ok {
		return nil, fmt.Errorf("%w: only members see party %s", party.ErrNotMember, name)
	}
	return p, nil
}

func (c *conn) createParty(ctx context.Context, name string) (*party.Party, error) {
	s := c.s
	if err := party.ValidName(name); err != nil {
		return nil, err
	}
	if err := c.roomForParty(ctx, name); err != nil {
		return nil, err
	}
	taken, err := s.takenSubnets(ctx, name)
	if err != nil {
		return nil, err
	}
	p, err := party.New(name, c.id, s.clock.Now(), func(x netip.Prefix) bool { return taken[x] != "" })
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	if err := s.store.Update(ctx, store.Parties, name, b, 0); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return nil, fmt.Errorf("%w: party %s exists; join it with an invite from a member, or pick another name", party.ErrPartyExists, name)
		}
		return nil, err
	}
	// A party created at the same moment through another server may have picked the
	// same subnet, not seeing this one. Both creators look again; the party whose name
	// sorts last moves, while its owner is still its only member.
	if taken, err = s.takenSubnets(ctx, name); err != nil {
		return nil, err
	}
	if other := taken[p.Prefix4]; other != "" && other < name {
		p, err = s.changeParty(ctx, name, func(q *party.Party) (bool, error) {
			if len(q.Members) != 1 || q.Prefix4 != p.Prefix4 {
				return false, nil
			}
			moved, err := party.New(name, q.Owner, q.Created, func(x netip.Prefix) bool { return taken[x] != "" })
			if err != nil {
				return false, err
			}
			*q = *moved
			return true, nil
		})
		if err != nil {
			return nil, err
		}
	}
	if err := s.addMembership(ctx, c.id, name); err != nil {
		return nil, err
	}
	return p, nil
}

// testHookCreated, when set, runs between a party's creation and the check for a subnet
// taken at the same moment.
var testHookCreated func()

// takenSubnets returns the IPv4 subnets of parties other than name, each with the name
// of a party that has it.
func (s *Server) takenSubnets(ctx context.Context, name string) (map[netip.Prefix]string, error) {
	if testHookCreated != nil {
		testHookCreated()
	}
	ents, err := s.store.List(ctx, store.Parties)
	if err != nil {
		return nil, err
	}
	taken := make(map[netip.Prefix]string, len(ents))
	for _, e := range ents {
		var q party.Party
		if e.Key == name || json.Unmarshal(e.Value, &q) != nil || len(q.Members) == 0 {
			continue
		}
		if cur, ok := taken[q.Prefix4]; !ok || e.Key < cur {
			taken[q.Prefix4] = e.Key
		}
	}
	return taken, nil
}

func (c *conn) joinParty(ctx context.Context, token string) (*party.Party, error) {
	s := c.s
	inv, err := party.ParseInvite(token)
	if err != nil {
		return nil, err
	}
	if err := inv.Verify(s.clock.Now()); err != nil {
		return nil, err
	}
	if err := c.roomForParty(ctx, inv.Party); err != nil {
		return nil, err
	}
	p, err := s.changeParty(ctx, inv.Party, func(p *party.Party) (bool, error) {
		if _, ok := p.Member(inv.Inviter); !ok {
			return false, fmt.Errorf("%w: the invite to party %s was signed by %s, who is not a member of it (or has left); ask a member for a new one",
				party.ErrInviteForged, inv.Party, inv.Inviter.Short())
		}
		if _, ok := p.Member(c.id); ok {
			return false, nil
		}
		_, err := p.Add(c.id, s.clock.Now())
		return err == nil, err
	})
	if err != nil {
		return nil, err
	}
	if err := s.addMembership(ctx, c.id, inv.Party); err != nil {
		return nil, err
	}
	return p, nil
}

// touchParties runs when node id authenticates: it rewrites the node's membership list,
// and each of its parties this server has not rewritten for partyRefresh, so that what
// is in use does not expire (store TTLs count from the last write). It also warms the
// membership cache. A conflict means someone else just wrote the record: fresh enough.
func (s *Server) touchParties(id identity.NodeID) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StoreTimeout)
	defer cancel()
	at := s.clock.Now()
	v, rev, err := s.store.GetRev(ctx, store.Memberships, id.String())
	if errors.Is(err, store.ErrNotFound) {
		s.cacheMemberships(id, nil, at)
		return
	}
	var names []string
	if err == nil {
		err = json.Unmarshal(v, &names)
	}
	if err != nil {
		s.log.Warn("reading memberships failed", "node", id.Short(), "err", err)
		return
	}
	s.cacheMemberships(id, names, at)
	if len(names) == 0 {
		return
	}
	if err := s.store.Update(ctx, store.Memberships, id.String(), v, rev); err != nil && !errors.Is(err, store.ErrConflict) {
		s.log.Warn("refreshing memberships failed", "node", id.Short(), "err", err)
	}
	for _, name := range names {
		s.members.refreshMu.Lock()
		if s.members.refreshed == nil {
			s.members.refreshed = make(map[string]time.Time)
		}
		last, ok := s.members.refreshed[name]
		due := !ok || at.Sub(last) >= partyRefresh || at.Before(last)
		if due {
			if len(s.members.refreshed) >= maxCacheEntries {
				clear(s.members.refreshed)
			}
			s.members.refreshed[name] = at
		}
		s.members.refreshMu.Unlock()
		if !due {
			continue
		}
		pv, prev, err := s.store.GetRev(ctx, store.Parties, name)
		if err == nil {
			err = s.store.Update(ctx, store.Parties, name, pv, prev)
		}
		if err != nil && !errors.Is(err, store.ErrConflict) && !errors.Is(err, store.ErrNotFound) {
			s.log.Warn("refreshing party failed", "party", name, "err", err)
		}
	}
}
