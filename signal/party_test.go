package signal_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"peerlink/clock"
	"peerlink/identity"
	"peerlink/party"
	"peerlink/signal"
	"peerlink/signal/signaltest"
	"peerlink/store"
	"peerlink/store/memstore"
	"peerlink/store/natsstore"
	"peerlink/store/natsstore/natstest"
)

// dialID connects a client with a fresh identity and returns both.
func dialID(t *testing.T, s *signaltest.Server) (*signal.Client, *identity.Identity) {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return s.DialAs(t, id, nil), id
}

func invite(t *testing.T, id *identity.Identity, name string) string {
	t.Helper()
	tok, err := party.NewInvite(id, name, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func offer(ctx context.Context, from *signal.Client, to identity.NodeID) error {
	info := testInfo()
	return from.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: to, Session: signal.NewNonce(), Info: &info})
}

// TestPartyLifecycle: create, invite, join, list with status, leave with ownership
// handed on, kick, and deletion with the last member, over a real server.
func TestPartyLifecycle(t *testing.T) {
	s := signaltest.Start(t, signal.Config{}, false)
	ctx := ctxT(t)
	a, aid := dialID(t, s)
	b, bid := dialID(t, s)
	c, _ := dialID(t, s)

	p, err := a.CreateParty(ctx, "lan")
	if err != nil {
		t.Fatal(err)
	}
	if p.Owner != a.NodeID() || len(p.Members) != 1 || !p.Members[0].Online {
		t.Fatalf("created %+v", p)
	}
	if _, err := b.CreateParty(ctx, "lan"); !errors.Is(err, party.ErrPartyExists) {
		t.Fatalf("second create = %v, want ErrPartyExists", err)
	}
	if _, err := b.CreateParty(ctx, "Bad Name"); !errors.Is(err, party.ErrBadName) {
		t.Fatalf("bad name = %v, want ErrBadName", err)
	}
	p, err = b.JoinParty(ctx, invite(t, aid, "lan"))
	if err != nil {
		t.Fatal(err)
	}
	mb, ok := p.Member(b.NodeID())
	if !ok || mb.IPv4 != p.Prefix4.Addr().Next().Next() {
		t.Fatalf("b joined as %+v in %+v", mb, p)
	}
	// Joining again changes nothing; any member may invite.
	if p2, err := b.JoinParty(ctx, invite(t, aid, "lan")); err != nil || len(p2.Members) != 2 {
		t.Fatalf("second join = %+v, %v", p2, err)
	}
	if p, err = c.JoinParty(ctx, invite(t, bid, "lan")); err != nil || len(p.Members) != 3 {
		t.Fatalf("join with a non-owner's invite = %+v, %v", p, err)
	}
	if names, err := b.Parties(ctx); err != nil || !slices.Equal(names, []string{"lan"}) {
		t.Fatalf("Parties = %v, %v", names, err)
	}
	// Status: c goes offline and shows so, with when it was last seen.
	c.Close()
	for deadline := time.Now().Add(5 * time.Second); ; {
		p, err = a.Party(ctx, "lan")
		if err != nil {
			t.Fatal(err)
		}
		var wrong error
		for _, m := range p.Members {
			if want := m.NodeID != c.NodeID(); m.Online != want || m.LastSeen.IsZero() {
				wrong = fmt.Errorf("member %s online=%v lastSeen=%v", m.NodeID.Short(), m.Online, m.LastSeen)
			}
		}
		if wrong == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(wrong)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Only the owner kicks; a member cannot.
	if err := b.KickFromParty(ctx, "lan", a.NodeID()); !errors.Is(err, party.ErrNotOwner) {
		t.Fatalf("kick by a member = %v, want ErrNotOwner", err)
	}
	if err := a.KickFromParty(ctx, "lan", c.NodeID()); err != nil {
		t.Fatalf("kick = %v", err)
	}
	if err := a.KickFromParty(ctx, "lan", c.NodeID()); !errors.Is(err, party.ErrNotMember) {
		t.Fatalf("kick of a non-member = %v, want ErrNotMember", err)
	}
	// The owner leaves: b, the oldest remaining, owns the party and keeps its address.
	if err := a.LeaveParty(ctx, "lan"); err != nil {
		t.Fatal(err)
	}
	if err := a.LeaveParty(ctx, "lan"); !errors.Is(err, party.ErrNotMember) {
		t.Fatalf("second leave = %v, want ErrNotMember", err)
	}
	if _, err := a.Party(ctx, "lan"); !errors.Is(err, party.ErrNotMember) {
		t.Fatalf("Party by a former member = %v, want ErrNotMember", err)
	}
	p, err = b.Party(ctx, "lan")
	if err != nil || p.Owner != b.NodeID() || len(p.Members) != 1 || p.Members[0].IPv4 != mb.IPv4 {
		t.Fatalf("after the owner left: %+v, %v", p, err)
	}
	if names, err := a.Parties(ctx); err != nil || len(names) != 0 {
		t.Fatalf("a's parties after leaving = %v, %v", names, err)
	}
	// The last member leaving deletes the party; its name is free again.
	if err := b.LeaveParty(ctx, "lan"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Party(ctx, "lan"); !errors.Is(err, party.ErrNoParty) {
		t.Fatalf("Party after the last left = %v, want ErrNoParty", err)
	}
	if _, err := a.CreateParty(ctx, "lan"); err != nil {
		t.Fatalf("create again after deletion = %v", err)
	}
}

// TestPartyInvites: expired, tampered, non-member and stale invites are refused with
// errors saying why.
func TestPartyInvites(t *testing.T) {
	s := signaltest.Start(t, signal.Config{}, false)
	ctx := ctxT(t)
	a, aid := dialID(t, s)
	b, bid := dialID(t, s)
	_, outsider := dialID(t, s)
	if _, err := a.CreateParty(ctx, "lan"); err != nil {
		t.Fatal(err)
	}
	expired, _ := party.NewInvite(aid, "lan", time.Minute, time.Now().Add(-5*time.Minute))
	good := invite(t, aid, "lan")
	tampered := good[:len(good)-2] + flip(good[len(good)-2]) + good[len(good)-1:]
	for _, tc := range []struct {
		name, token string
		want        error
		text        string
	}{
		{"expired", expired, party.ErrInviteExpired, "expired 4m"},
		{"tampered", tampered, party.ErrInviteForged, "signature"},
		{"signed by a non-member", invite(t, outsider, "lan"), party.ErrInviteForged, "not a member"},
		{"malformed", "plinv1_nonsense!", party.ErrInviteMalformed, "base64"},
		{"no such party", invite(t, aid, "other"), party.ErrNoParty, "other"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := b.JoinParty(ctx, tc.token)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("join = %v, want %v saying %q", err, tc.want, tc.text)
			}
		})
	}
	// An invite from a member who has since left no longer works.
	if _, err := b.JoinParty(ctx, good); err != nil {
		t.Fatal(err)
	}
	fromB := invite(t, bid, "lan")
	if err := b.LeaveParty(ctx, "lan"); err != nil {
		t.Fatal(err)
	}
	c, _ := dialID(t, s)
	if _, err := c.JoinParty(ctx, fromB); !errors.Is(err, party.ErrInviteForged) {
		t.Fatalf("join with a former member's invite = %v", err)
	}
}

func flip(c byte) string {
	if c == 'A' {
		return "B"
	}
	return "A"
}

// TestPartyEnforcement: members reach each other; an outsider can neither look up,
// signal nor open a relay to a member; nodes in no party work as before; a kicked member
// is refused within MembershipCacheTTL, also through another server.
func TestPartyEnforcement(t *testing.T) {
	st := memstore.New(memstore.Config{})
	s1 := signaltest.Start(t, signal.Config{Store: st}, false)
	s2 := signaltest.Start(t, signal.Config{Store: st}, false)
	ctx := ctxT(t)
	a, aid := dialID(t, s1)
	b, _ := dialID(t, s2)
	out, _ := dialID(t, s1)
	free1, _ := dialID(t, s1)
	free2, _ := dialID(t, s2)
	if err := a.Publish(ctx, testInfo()); err != nil {
		t.Fatal(err)
	}
	// Before any party, everyone reaches everyone.
	exchange(t, out, a)
	if _, err := a.CreateParty(ctx, "lan"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.JoinParty(ctx, invite(t, aid, "lan")); err != nil {
		t.Fatal(err)
	}
	exchange(t, a, b)
	exchange(t, free1, free2) // no party at all: as today

	refused := func(c *signal.Client, to identity.NodeID) error {
		if err := offer(ctx, c, to); !errors.Is(err, party.ErrNotShared) {
			return fmt.Errorf("offer = %v, want ErrNotShared", err)
		}
		if _, err := c.Lookup(ctx, to); !errors.Is(err, party.ErrNotShared) {
			return fmt.Errorf("lookup = %v, want ErrNotShared", err)
		}
		if _, err := c.OpenRelay(ctx, to); !errors.Is(err, party.ErrNotShared) {
			return fmt.Errorf("relay open = %v, want ErrNotShared", err)
		}
		return nil
	}
	if err := refused(out, a.NodeID()); err != nil {
		t.Fatalf("outsider to member: %v", err)
	}
	if err := refused(a, out.NodeID()); err != nil {
		t.Fatalf("member to outsider: %v", err)
	}
	var se *signal.Error
	if err := offer(ctx, out, b.NodeID()); !errors.As(err, &se) || se.Code != signal.CodeNotShared || !strings.Contains(err.Error(), "no party") {
		t.Fatalf("refusal text: %v", err)
	}

	// b is kicked through s1; s2 (which has b and may have cached its parties) refuses
	// b's messages to a within the cache lifetime.
	if _, err := b.Lookup(ctx, a.NodeID()); err != nil {
		t.Fatal(err)
	}
	if err := a.KickFromParty(ctx, "lan", b.NodeID()); err != nil {
		t.Fatal(err)
	}
	kicked := time.Now()
	for {
		// What s2 cached was read before the kick, so an offer sent after the cache
		// lifetime must be refused, however slowly the test runs.
		sent := time.Since(kicked)
		err := offer(ctx, b, a.NodeID())
		if errors.Is(err, party.ErrNotShared) {
			break
		}
		if err != nil {
			t.Fatalf("offer after kick: %v", err)
		}
		if sent > signal.MembershipCacheTTL+100*time.Millisecond {
			t.Fatalf("kicked member still reaches the party with an offer sent %v after the kick", sent)
		}
		recv(t, a)
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("kick took effect on the other server after %v", time.Since(kicked).Round(time.Millisecond))
	if err := refused(b, a.NodeID()); err != nil {
		t.Fatalf("kicked member: %v", err)
	}
	// b, now in no party, and the other partyless nodes still reach each other.
	exchange(t, b, free1)
}

func TestWGPublicKey(t *testing.T) {
	s := signaltest.Start(t, signal.Config{}, false)
	ctx := ctxT(t)
	a, b := s.Dial(t, nil), s.Dial(t, nil)
	info := testInfo()
	info.WGPublicKey = strings.Repeat("ab", 32)
	if err := a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: b.NodeID(), Session: "wg", Info: &info}); err != nil {
		t.Fatal(err)
	}
	if m := recv(t, b); m.Info.WGPublicKey != info.WGPublicKey {
		t.Fatalf("wgPublicKey arrived as %q", m.Info.WGPublicKey)
	}
	for _, bad := range []string{"ab", strings.Repeat("zz", 32), strings.Repeat("ab", 33)} {
		info.WGPublicKey = bad
		err := a.Send(ctx, &signal.Message{Type: signal.TypeOffer, To: b.NodeID(), Session: "wg", Info: &info})
		if !errors.Is(err, signal.ErrInvalid) {
			t.Fatalf("wgPublicKey %q: %v, want invalid", bad, err)
		}
	}
}

// TestPartyNATS: two servers on one NATS store: a join through one is seen through the
// other, and simultaneous joins through both get distinct addresses.
func TestPartyNATS(t *testing.T) {
	ns := natstest.Start(t)
	newStore := func() store.Store {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		st, err := natsstore.New(ctx, natsstore.Config{URL: ns.ClientURL(), Timeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	s1 := signaltest.Start(t, signal.Config{Store: newStore()}, false)
	s2 := signaltest.Start(t, signal.Config{Store: newStore()}, false)
	ctx := ctxT(t)
	owner, oid := dialID(t, s1)
	if _, err := owner.CreateParty(ctx, "lan"); err != nil {
		t.Fatal(err)
	}
	viaB, _ := dialID(t, s2)
	if _, err := viaB.JoinParty(ctx, invite(t, oid, "lan")); err != nil {
		t.Fatal(err)
	}
	p, err := owner.Party(ctx, "lan")
	if err != nil || len(p.Members) != 2 {
		t.Fatalf("join through the other server not seen: %+v, %v", p, err)
	}

	const n = 12
	clients := make([]*signal.Client, n)
	for i := range clients {
		srv := s1
		if i%2 == 1 {
			srv = s2
		}
		clients[i], _ = dialID(t, srv)
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	tok := invite(t, oid, "lan")
	for i, c := range clients {
		wg.Go(func() { _, errs[i] = c.JoinParty(ctx, tok) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("join %d: %v", i, err)
		}
	}
	p, err = viaB.Party(ctx, "lan")
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Members) != n+2 {
		t.Fatalf("%d members after %d concurrent joins, want %d", len(p.Members), n, n+2)
	}
	seen := map[netip.Addr]bool{}
	for _, m := range p.Members {
		if seen[m.IPv4] {
			t.Fatalf("address %v given twice", m.IPv4)
		}
		seen[m.IPv4] = true
	}
	// Members on different servers signal each other; an outsider cannot.
	exchange(t, clients[0], clients[1])
	out, _ := dialID(t, s2)
	if err := offer(ctx, out, owner.NodeID()); !errors.Is(err, party.ErrNotShared) {
		t.Fatalf("outsider across servers: %v", err)
	}
}

// TestPartyOutlivesTTL: a party whose members keep connecting is rewritten and so
// outlives the store's party TTL; one whose members stay away expires.
func TestPartyOutlivesTTL(t *testing.T) {
	fc := clock.NewFake(time.Now())
	st := memstore.New(memstore.Config{Clock: fc, TTLs: store.TTLs{Parties: time.Hour, Memberships: time.Hour}})
	s := signaltest.Start(t, signal.Config{Store: st}, false)
	ctx := ctxT(t)
	a, aid := dialID(t, s)
	b, _ := dialID(t, s)
	if _, err := a.CreateParty(ctx, "used"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.CreateParty(ctx, "idle"); err != nil {
		t.Fatal(err)
	}
	a.Close()
	b.Close()
	fc.Advance(50 * time.Minute)
	a = s.DialAs(t, aid, nil) // reconnecting refreshes a's party
	// The server refreshes right after the welcome, before it reads a's first request:
	// once that is answered, the refresh is done.
	if _, err := a.Parties(ctx); err != nil {
		t.Fatal(err)
	}
	fc.Advance(50 * time.Minute)
	if p, err := a.Party(ctx, "used"); err != nil || len(p.Members) != 1 {
		t.Fatalf("party in use after 100 minutes with a 1 h TTL: %+v, %v", p, err)
	}
	if names, err := a.Parties(ctx); err != nil || !slices.Equal(names, []string{"used"}) {
		t.Fatalf("memberships after refresh = %v, %v", names, err)
	}
	if _, err := a.CreateParty(ctx, "idle"); err != nil {
		t.Fatalf("the idle party's name after it expired: %v", err)
	}
}
