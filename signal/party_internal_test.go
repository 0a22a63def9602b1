package signal

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"peerlink/party"
	"peerlink/store"
	"peerlink/store/memstore"
)

// TestCreateSubnetRace: two parties created at the same moment through two servers pick
// the same subnet, neither seeing the other; the one whose name sorts last moves.
func TestCreateSubnetRace(t *testing.T) {
	a, b := mustID(t), mustID(t)
	now := time.Now()
	// Two names that hash to the same /24.
	byPrefix := map[netip.Prefix]string{}
	var first, second string
	for i := 0; first == ""; i++ {
		n := fmt.Sprintf("c%d", i)
		p, err := party.New(n, a.NodeID(), now, nil)
		if err != nil {
			t.Fatal(err)
		}
		if o, ok := byPrefix[p.Prefix4]; ok {
			first, second = o, n
		}
		byPrefix[p.Prefix4] = n
	}
	if first > second {
		first, second = second, first
	}
	for _, tc := range []struct {
		create, concurrent string
		moves              bool
	}{
		{second, first, true},
		{first, second, false},
	} {
		t.Run(tc.create, func(t *testing.T) {
			st := memstore.New(memstore.Config{})
			srv, err := NewServer(Config{Store: st, PingInterval: -1})
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			ctx := context.Background()
			other, _ := party.New(tc.concurrent, b.NodeID(), now, nil)
			calls := 0
			testHookCreated = func() {
				// The other server's party lands after this one looked for free subnets.
				if calls++; calls == 2 {
					v, _ := json.Marshal(other)
					if err := st.Put(ctx, store.Parties, other.Name, v); err != nil {
						t.Error(err)
					}
				}
			}
			defer func() { testHookCreated = nil }()
			c := srv.newConn(nil, "h", "test")
			c.id = a.NodeID()
			p, err := c.createParty(ctx, tc.create)
			if err != nil {
				t.Fatal(err)
			}
			stored, _, err := srv.loadParty(ctx, tc.create)
			if err != nil {
				t.Fatal(err)
			}
			if stored.Prefix4 != p.Prefix4 || stored.Members[0].IPv4 != p.Members[0].IPv4 {
				t.Fatalf("answered %v, stored %v", p.Prefix4, stored.Prefix4)
			}
			if moved := p.Prefix4 != other.Prefix4; moved != tc.moves {
				t.Fatalf("%s created with %v beside %s on %v: moved=%v, want %v", tc.create, p.Prefix4, tc.concurrent, other.Prefix4, moved, tc.moves)
			}
			if !p.Prefix4.Contains(p.Members[0].IPv4) || p.Validate() != nil {
				t.Fatalf("moved party inconsistent: %+v", p)
			}
		})
	}
}
