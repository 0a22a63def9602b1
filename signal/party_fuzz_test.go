package signal

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"peerlink/party"
)

// FuzzPartyBodies feeds arbitrary party and parties bodies to the client's decoders: they
// fail as malformed or return a party that validates and names that are valid.
func FuzzPartyBodies(f *testing.F) {
	a, b := mustID(f), mustID(f)
	p, err := party.New("lan", a.NodeID(), time.Now(), nil)
	if err != nil {
		f.Fatal(err)
	}
	p.Add(b.NodeID(), time.Now())
	p.Members[0].Online = true
	body, _ := json.Marshal(p)
	f.Add(body)
	f.Add([]byte(`{"names":["lan","x.y"]}`))
	f.Add([]byte(`{"names":["BAD"]}`))
	f.Add([]byte(`{"name":"lan","members":[]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		if p, err := decodeParty(data); err == nil {
			if err := p.Validate(); err != nil {
				t.Fatalf("decodeParty returned an invalid party: %v", err)
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatalf("decodeParty error %v is not malformed", err)
		}
		if names, err := decodeParties(data); err == nil {
			for _, n := range names {
				if party.ValidName(n) != nil {
					t.Fatalf("decodeParties returned %q", n)
				}
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatalf("decodeParties error %v is not malformed", err)
		}
	})
}
