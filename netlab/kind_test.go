package netlab

import (
	"testing"

	"peerlink/nat"
)

func TestParseKind(t *testing.T) {
	for _, k := range AllKinds() {
		got, err := ParseKind(k.String())
		if err != nil || got != k {
			t.Errorf("ParseKind(%q) = %v, %v", k.String(), got, err)
		}
	}
	for in, want := range map[string]Kind{"FullCone": KindFullCone, "port_restricted": KindPortRestricted, " CGNAT ": KindCGNAT, "symmetricseq": KindSymmetricSequential} {
		if got, err := ParseKind(in); err != nil || got != want {
			t.Errorf("ParseKind(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "unknown", "cone"} {
		if _, err := ParseKind(bad); err == nil {
			t.Errorf("ParseKind(%q) succeeded", bad)
		}
	}
}

func TestClaimsAreDistinctAndKnown(t *testing.T) {
	seen := map[string]Kind{}
	for _, k := range AllKinds() {
		c := k.Claim()
		if !c.UDPBlocked && !c.Type().Known() {
			t.Errorf("%s claims %s: a policy is unknown", k, ClaimString(c))
		}
		s := ClaimString(c)
		if other, dup := seen[s]; dup {
			t.Errorf("%s and %s both claim %s", k, other, s)
		}
		seen[s] = k
	}
}

func TestSameBehaviour(t *testing.T) {
	seq := KindSymmetricSequential.Claim()
	seq2 := seq
	seq2.PortDelta = 2
	open := KindNone.Claim()
	natted := KindFullCone.Claim()
	tests := []struct {
		a, b nat.Profile
		want bool
	}{
		{seq, seq, true},
		{seq, seq2, false},
		{open, natted, false},
		{KindUDPBlocked.Claim(), nat.Profile{UDPBlocked: true, Mapping: nat.MappingEI}, true},
		{KindUDPBlocked.Claim(), natted, false},
		{natted, KindRestrictedCone.Claim(), false},
	}
	for _, tt := range tests {
		if got := SameBehaviour(tt.a, tt.b); got != tt.want {
			t.Errorf("SameBehaviour(%s, %s) = %v", ClaimString(tt.a), ClaimString(tt.b), got)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	bad := []Config{
		{Sites: []SiteConfig{{Kind: KindUnknown}}},
		{Sites: []SiteConfig{{Kind: KindFullCone}, {Kind: KindFullCone}}},
		{Sites: []SiteConfig{{Kind: KindFullCone, Name: "Bad Name"}}},
		{Sites: []SiteConfig{{Kind: KindFullCone, Name: "srv"}}},
		{Sites: []SiteConfig{{Kind: KindNone, Hosts: 2}}},
		{Sites: []SiteConfig{{Kind: KindFullCone, Link: Link{Loss: 101}}}},
	}
	for _, c := range bad {
		if _, err := c.sites(); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	sites, err := Config{}.sites()
	if err != nil || len(sites) != len(AllKinds()) {
		t.Fatalf("zero Config: %d sites, %v", len(sites), err)
	}
	for _, s := range sites {
		if s.Name != s.Kind.String() || s.Hosts != 1 {
			t.Errorf("default site %+v", s)
		}
	}
}
