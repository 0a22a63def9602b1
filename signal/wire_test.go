package signal

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"peerlink/identity"
	"peerlink/nat"
)

func mustID(t testing.TB) *identity.Identity {
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func sampleInfo() ConnectionInfo {
	p := nat.Profile{Mapping: nat.MappingEI, Filtering: nat.FilteringEI, Allocation: nat.AllocationPP,
		PublicIP: netip.MustParseAddr("1.2.3.4"), PublicPort: 51820, Confidence: nat.ConfidenceMedium}
	return NewConnectionInfo(p, netip.MustParseAddrPort("192.168.1.10:51820"), []Candidate{
		{Type: CandidateHost, IP: netip.MustParseAddr("192.168.1.10"), Port: 51820, Priority: CandidatePriority(CandidateHost, 65535)},
	})
}

func TestParseFrame(t *testing.T) {
	tests := []struct {
		in     string
		id     uint64
		typ    Type
		errSub string
	}{
		{`{"id":7,"lookup":{"nodeID":"x"}}`, 7, TypeLookup, ""},
		{`{"ok":{}}`, 0, TypeOK, ""},
		{` { "turn" : { } , "id" : 18446744073709551615 } `, 1<<64 - 1, TypeTURN, ""},
		{`{"lookup":`, 0, "", "not a JSON object"},
		{`[1]`, 0, "", "not a JSON object"},
		{`null`, 0, "", "not a JSON object"},
		{`{}`, 0, "", "no message type"},
		{`{"id":1}`, 0, "", "no message type"},
		{`{"a":{},"b":{}}`, 0, "", "two message types"},
		{`{"id":-1,"ok":{}}`, 0, "", "unsigned integer"},
		{`{"id":1.5,"ok":{}}`, 0, "", "unsigned integer"},
		{`{"id":"1","ok":{}}`, 0, "", "unsigned integer"},
		{`{"ok":[]}`, 0, "", "not a JSON object"},
		{`{"ok":"x"}`, 0, "", "not a JSON object"},
	}
	for _, tt := range tests {
		f, err := ParseFrame([]byte(tt.in))
		if tt.errSub != "" {
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tt.errSub) {
				t.Errorf("ParseFrame(%s) = %v, want malformed %q", tt.in, err, tt.errSub)
			}
			continue
		}
		if err != nil || f.ID != tt.id || f.Type != tt.typ {
			t.Errorf("ParseFrame(%s) = %+v, %v", tt.in, f, err)
		}
	}
	if got := string(AppendFrame(nil, 3, TypeOK, []byte(`{}`))); got != `{"id":3,"ok":{}}` {
		t.Errorf("AppendFrame = %s", got)
	}
}

// TestSeedsShape: an offer on the wire has the classic field names of connectionInfo,
// extended with the NAT profile.
func TestSeedsShape(t *testing.T) {
	a, b := mustID(t), mustID(t)
	info := sampleInfo()
	m := &Message{Type: TypeOffer, To: b.NodeID(), Session: "6f1c2a9e-0000-4000-8000-000000000001", Info: &info}
	if err := m.Sign(a, time.Now()); err != nil {
		t.Fatal(err)
	}
	f, err := m.AppendFrame(nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]map[string]any
	if err := json.Unmarshal(f, &v); err != nil {
		t.Fatal(err)
	}
	o := v["offer"]
	if o["fromNodeID"] != a.NodeID().String() || o["toNodeID"] != b.NodeID().String() || o["sessionID"] != m.Session {
		t.Fatalf("offer header %v", o)
	}
	if s, _ := o["signature"].(string); len(s) != 128 {
		t.Fatalf("signature %q, want 128 hex digits", s)
	}
	ci := o["connectionInfo"].(map[string]any)
	want := map[string]any{"publicIP": "1.2.3.4", "publicPort": 51820.0, "localIP": "192.168.1.10", "localPort": 51820.0, "natType": "fullCone"}
	for k, w := range want {
		if ci[k] != w {
			t.Errorf("connectionInfo.%s = %v, want %v", k, ci[k], w)
		}
	}
	prof := ci["profile"].(map[string]any)
	if prof["mapping"] != "ei" || prof["filtering"] != "ei" || prof["allocation"] != "pp" || prof["public_ip"] != "1.2.3.4" {
		t.Errorf("connectionInfo.profile = %v", prof)
	}
}

func TestSignVerify(t *testing.T) {
	a, b, c := mustID(t), mustID(t), mustID(t)
	now := time.Now()
	info := sampleInfo()
	sign := func() *Message {
		m := &Message{Type: TypeOffer, To: b.NodeID(), Session: "s", Info: &info}
		if err := m.Sign(a, now); err != nil {
			t.Fatal(err)
		}
		f, _ := m.AppendFrame(nil, 0)
		fr, err := ParseFrame(f)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeMessage(fr.Type, fr.Body)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if err := sign().Verify(b.NodeID(), now, time.Minute); err != nil {
		t.Fatalf("genuine message: %v", err)
	}
	tests := []struct {
		name string
		edit func(m *Message)
		me   identity.NodeID
		now  time.Time
		want *Error
	}{
		{"wrong recipient", nil, c.NodeID(), now, ErrWrongRecipient},
		{"too old", nil, b.NodeID(), now.Add(61 * time.Second), ErrStale},
		{"from the future", nil, b.NodeID(), now.Add(-61 * time.Second), ErrStale},
		{"body altered", func(m *Message) { m.Body = bytes.Replace(m.Body, []byte("51820"), []byte("51821"), 1) }, b.NodeID(), now, ErrBadSignature},
		{"session altered", func(m *Message) { m.Session = "t" }, b.NodeID(), now, ErrBadSignature},
		{"type altered", func(m *Message) { m.Type = TypeAnswer }, b.NodeID(), now, ErrBadSignature},
		{"nonce altered", func(m *Message) { m.Nonce = NewNonce() }, b.NodeID(), now, ErrBadSignature},
		{"sender altered", func(m *Message) { m.From = c.NodeID() }, b.NodeID(), now, ErrBadSignature},
		{"time altered", func(m *Message) { m.Time = m.Time.Add(time.Millisecond) }, b.NodeID(), now, ErrBadSignature},
	}
	for _, tt := range tests {
		m := sign()
		if tt.edit != nil {
			tt.edit(m)
		}
		if err := m.Verify(tt.me, tt.now, time.Minute); !errors.Is(err, tt.want) {
			t.Errorf("%s: Verify = %v, want %v", tt.name, err, tt.want)
		}
	}
}

func TestDecodeMessageRejects(t *testing.T) {
	a, b := mustID(t), mustID(t)
	info := sampleInfo()
	m := &Message{Type: TypeOffer, To: b.NodeID(), Session: "s", Info: &info}
	if err := m.Sign(a, time.Now()); err != nil {
		t.Fatal(err)
	}
	f, _ := m.AppendFrame(nil, 0)
	fr, _ := ParseFrame(f)
	good := string(fr.Body)
	sigHex := hex.EncodeToString(m.Signature)
	tests := []struct {
		name, old, new string
		want           *Error
	}{
		{"bad from", a.NodeID().String(), "plnotanodeid", ErrMalformed},
		{"bad to", b.NodeID().String(), b.NodeID().String()[:20], ErrMalformed},
		{"no session", `"sessionID":"s",`, ``, ErrMalformed},
		{"session with newline", `"sessionID":"s"`, `"sessionID":"s\n"`, ErrMalformed},
		{"short nonce", `"nonce":"` + m.Nonce + `"`, `"nonce":"abc"`, ErrMalformed},
		{"nonce with newline", `"nonce":"` + m.Nonce + `"`, `"nonce":"` + m.Nonce[:20] + `\n"`, ErrMalformed},
		{"zero timestamp", `"timestamp":`, `"timestamp":0,"x":`, ErrMalformed},
		{"float timestamp", `"timestamp":`, `"timestamp":1.5,"x":`, ErrMalformed},
		{"body not object", `"connectionInfo":{`, `"connectionInfo":[{`, ErrMalformed},
		{"second body", `"connectionInfo":`, `"punch":{},"connectionInfo":`, ErrMalformed},
		{"bad natType", `"natType":"fullCone"`, `"natType":"tubular"`, ErrMalformed},
		{"bad candidate type", `"type":"host"`, `"type":"teleport"`, ErrMalformed},
		{"candidate port zero", `"port":51820`, `"port":0`, ErrInvalid},
		{"signature short", `"signature":"` + sigHex, `"signature":"` + sigHex[:126], ErrBadSignature},
		{"signature not hex", `"signature":"` + sigHex, `"signature":"zz` + sigHex[2:], ErrBadSignature},
	}
	for _, tt := range tests {
		body := strings.Replace(good, tt.old, tt.new, 1)
		if body == good {
			t.Fatalf("%s: edit %q not found in %s", tt.name, tt.old, good)
		}
		if _, err := DecodeMessage(TypeOffer, []byte(body)); !errors.Is(err, tt.want) {
			t.Errorf("%s: DecodeMessage = %v, want %v", tt.name, err, tt.want)
		}
	}
	if _, err := DecodeMessage(TypeLookup, []byte(good)); !errors.Is(err, ErrUnsupported) {
		t.Errorf("DecodeMessage(lookup) = %v", err)
	}
}

func TestSignValidates(t *testing.T) {
	a, b := mustID(t), mustID(t)
	tests := []struct {
		name string
		m    Message
	}{
		{"no body", Message{Type: TypeOffer, To: b.NodeID(), Session: "s"}},
		{"body of another type", Message{Type: TypeOffer, To: b.NodeID(), Session: "s", Candidate: &Candidate{}}},
		{"no recipient", Message{Type: TypeOffer, Session: "s", Info: &ConnectionInfo{}}},
		{"no session", Message{Type: TypeOffer, To: b.NodeID(), Info: &ConnectionInfo{}}},
		{"publish with recipient", Message{Type: TypePublish, To: b.NodeID(), Info: &ConnectionInfo{}}},
		{"invalid candidate", Message{Type: TypeCandidate, To: b.NodeID(), Session: "s", Candidate: &Candidate{Type: CandidateHost}}},
		{"punch without technique", Message{Type: TypePunch, To: b.NodeID(), Session: "s", Punch: &Punch{StartAt: time.Now()}}},
		{"too many candidates", Message{Type: TypeOffer, To: b.NodeID(), Session: "s", Info: &ConnectionInfo{Candidates: make([]Candidate, MaxCandidates+1)}}},
		{"long bye", Message{Type: TypeBye, To: b.NodeID(), Session: "s", Bye: &Bye{Reason: strings.Repeat("x", MaxReasonLen+1)}}},
		{"not signed type", Message{Type: TypeLookup}},
	}
	for _, tt := range tests {
		if err := tt.m.Sign(a, time.Now()); err == nil {
			t.Errorf("%s: Sign accepted it", tt.name)
		}
	}
	bye := Message{Type: TypeBye, To: b.NodeID(), Session: "s"}
	if err := bye.Sign(a, time.Now()); err != nil || string(bye.Body) != `{}` {
		t.Errorf("bye without body: %v, body %s", err, bye.Body)
	}
}

func TestCandidateTypes(t *testing.T) {
	for in, want := range map[string]CandidateType{
		"host": CandidateHost, "srflx": CandidateSrflx, "prflx": CandidatePrflx, "relayed": CandidateRelayed,
		"serverReflexive": CandidateSrflx, "peerReflexive": CandidatePrflx, "relay": CandidateRelayed,
	} {
		var c CandidateType
		if err := c.UnmarshalText([]byte(in)); err != nil || c != want {
			t.Errorf("UnmarshalText(%q) = %v, %v", in, c, err)
		}
	}
	var c CandidateType
	if c.UnmarshalText([]byte("mdns")) == nil {
		t.Error("unknown candidate type accepted")
	}
	if _, err := CandidateType(0).MarshalText(); err == nil {
		t.Error("zero candidate type marshalled")
	}
	// RFC 8445 §5.1.2.1: host > prflx > srflx > relayed, and the formula's layout.
	h, p, s, r := CandidatePriority(CandidateHost, 65535), CandidatePriority(CandidatePrflx, 65535), CandidatePriority(CandidateSrflx, 65535), CandidatePriority(CandidateRelayed, 65535)
	if !(h > p && p > s && s > r) || h != 126<<24|65535<<8|255 {
		t.Errorf("priorities host %d prflx %d srflx %d relayed %d", h, p, s, r)
	}
}

func TestNATTypeNames(t *testing.T) {
	for c := nat.ClassicUnknown; c <= nat.ClassicUDPBlocked; c++ {
		var ci ConnectionInfo
		in := `{"natType":"` + c.String() + `"}`
		if err := json.Unmarshal([]byte(in), &ci); err != nil || ci.NATType != c {
			t.Errorf("natType %q decoded as %v, %v", c.String(), ci.NATType, err)
		}
	}
}

func TestReplayGuard(t *testing.T) {
	a, b := mustID(t).NodeID(), mustID(t).NodeID()
	skew := time.Minute
	g := NewReplayGuard(skew, 4)
	t0 := time.Unix(1e9, 0)
	if err := g.Check(a, "n1", t0); err != nil {
		t.Fatal(err)
	}
	if err := g.Check(b, "n1", t0); err != nil {
		t.Fatalf("same nonce from another sender: %v", err)
	}
	if err := g.Check(a, "n1", t0.Add(time.Second)); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay = %v", err)
	}
	// An entry must outlive every timestamp that could still pass Verify: 2×skew.
	if err := g.Check(a, "n1", t0.Add(2*skew-time.Millisecond)); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay just inside 2×skew = %v", err)
	}
	if err := g.Check(a, "n1", t0.Add(2*skew+time.Second)); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay after a rotation = %v (entries must survive one rotation)", err)
	}
	// Bounded: when full it refuses rather than forgets.
	g.Check(a, "n2", t0.Add(2*skew+time.Second))
	g.Check(a, "n3", t0.Add(2*skew+time.Second))
	if err := g.Check(a, "n4", t0.Add(2*skew+time.Second)); !errors.Is(err, ErrOverloaded) {
		t.Fatalf("full guard = %v, want ErrOverloaded", err)
	}
	// Long after, everything has aged out.
	if err := g.Check(a, "n1", t0.Add(10*skew)); err != nil || g.Len() != 1 {
		t.Fatalf("after aging out: %v, %d entries", err, g.Len())
	}
}

func TestTURNPasswordVector(t *testing.T) {
	// Computed independently with:
	//   printf '1700000000:plnode' | openssl dgst -sha1 -hmac s3cret -binary | base64
	const want = "ZbP05rgF0uyo4qqGVu46wqzSHEs="
	if got := TURNPassword("s3cret", "1700000000:plnode"); got != want {
		t.Fatalf("TURNPassword = %s, want %s", got, want)
	}
	id := mustID(t).NodeID()
	c := NewTURNCredentials("s3cret", id, time.Unix(1700000000, 0), time.Hour)
	if c.Username != "1700003600:"+id.String() || !c.Expiry().Equal(time.Unix(1700003600, 0)) {
		t.Fatalf("credentials %+v", c)
	}
	b, _ := json.Marshal(c)
	if !strings.Contains(string(b), `"ttl":3600`) {
		t.Fatalf("JSON %s lacks ttl in seconds", b)
	}
}

// FuzzParseFrame: any bytes a client sends are either a frame or a malformed error,
// and every signed message that decodes can be verified without panicking.
func FuzzParseFrame(f *testing.F) {
	a, b := mustID(f), mustID(f)
	info := sampleInfo()
	for _, m := range []*Message{
		{Type: TypeOffer, To: b.NodeID(), Session: "s", Info: &info},
		{Type: TypeCandidate, To: b.NodeID(), Session: "s", Candidate: &info.Candidates[0]},
		{Type: TypePunch, To: b.NodeID(), Session: "s", Punch: &Punch{Technique: nat.Birthday, StartAt: time.Now(), Addresses: []netip.AddrPort{netip.MustParseAddrPort("1.2.3.4:5")}, Sockets: 256}},
		{Type: TypeBye, To: b.NodeID(), Session: "s"},
		{Type: TypePublish, Info: &info},
	} {
		if err := m.Sign(a, time.Now()); err != nil {
			f.Fatal(err)
		}
		fr, _ := m.AppendFrame(nil, 3)
		f.Add(fr)
	}
	f.Add([]byte(`{"id":1,"auth":{"nodeID":"x","host":"h","signature":"00"}}`))
	f.Add([]byte(`{"lookup":{}}`))
	f.Add([]byte(`{"id":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := ParseFrame(data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseFrame error %v is not malformed", err)
			}
			return
		}
		if fr.Type == "" || len(fr.Body) == 0 {
			t.Fatalf("ParseFrame accepted a frame without type or body")
		}
		m, err := DecodeMessage(fr.Type, fr.Body)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("DecodeMessage error %v is not an *Error", err)
			}
			return
		}
		_ = m.Verify(b.NodeID(), time.Now(), time.Minute)
		// A decoded message re-encodes to a frame that decodes to the same header.
		out, err := m.AppendFrame(nil, fr.ID)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		fr2, err := ParseFrame(out)
		if err != nil {
			t.Fatalf("re-encoded frame does not parse: %v\n%s", err, out)
		}
		m2, err := DecodeMessage(fr2.Type, fr2.Body)
		if err != nil {
			t.Fatalf("re-encoded message does not decode: %v\n%s", err, out)
		}
		if m2.From != m.From || m2.To != m.To || m2.Session != m.Session || !m2.Time.Equal(m.Time) || m2.Nonce != m.Nonce || !bytes.Equal(m2.Signature, m.Signature) {
			t.Fatalf("header changed in re-encoding")
		}
	})
}

// TestProtocolVector checks the test vector in docs/protocol.md section 5.4 and 4.
func TestProtocolVector(t *testing.T) {
	seed := func(start byte) *identity.Identity {
		s := make([]byte, ed25519.SeedSize)
		for i := range s {
			s[i] = start + byte(i)
		}
		return identity.FromPrivateKey(ed25519.NewKeyFromSeed(s))
	}
	a, b := seed(0), seed(100)
	const frame = `{"id":7,"offer":{"fromNodeID":"plaoqqpp7tzyil4hlq3umoos6atft6jvrqtosq2xy53sdgiesvgg4fmr22","toNodeID":"plbo6di2sxmz6dqajaxwoh7v7fduwf7x7kg7gs6w7uawzmnp3pfv4fkqho","sessionID":"6f1c2a9e-4d3b-4c1a-9b7e-2f0d5a8c1e33","timestamp":1767225600000,"nonce":"q2Vf8yXvT1mJ0bW3nL6pRg","connectionInfo":{"publicIP":"203.0.113.7","publicPort":40001,"localIP":"192.168.1.10","localPort":51820,"natType":"portRestricted","profile":{"mapping":"ei","filtering":"pd","allocation":"pp","public_ip":"203.0.113.7","public_port":40001,"hairpinning":false,"confidence":"high"},"candidates":[{"type":"host","ip":"192.168.1.10","port":51820,"priority":2130706431}]},"signature":"ea8c5e72e44d141503536468f0bd74ea12b8d27e1c8b4b704adb65605bf0fae4ca892630eab2f3420984092e63c7e69dc0b9464147c680695b0226f3ca177c03"}}`
	if a.NodeID().String() != "plaoqqpp7tzyil4hlq3umoos6atft6jvrqtosq2xy53sdgiesvgg4fmr22" || b.NodeID().String() != "plbo6di2sxmz6dqajaxwoh7v7fduwf7x7kg7gs6w7uawzmnp3pfv4fkqho" {
		t.Fatalf("NodeIDs %s %s differ from the document", a.NodeID(), b.NodeID())
	}
	fr, err := ParseFrame([]byte(frame))
	if err != nil {
		t.Fatal(err)
	}
	m, err := DecodeMessage(fr.Type, fr.Body)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Verify(b.NodeID(), time.UnixMilli(1767225600000), time.Minute); err != nil {
		t.Fatalf("document's offer does not verify: %v", err)
	}
	// Signing the same content again gives the same frame (ed25519 is deterministic).
	again := &Message{Type: TypeOffer, To: b.NodeID(), Session: m.Session, Info: m.Info, Time: m.Time, Nonce: m.Nonce}
	if err := again.Sign(a, time.Now()); err != nil {
		t.Fatal(err)
	}
	if out, _ := again.AppendFrame(nil, 7); string(out) != frame {
		t.Fatalf("re-signed frame differs from the document:\n%s", out)
	}
	authSig := hex.EncodeToString(a.Sign(AuthSigningInput("rdv.example:443", "bm9uY2Utbm9uY2Utbm9uY2Utbm9u", a.NodeID())))
	if authSig != "d9b41c35a2723c897e237ec750a420bc5a4d3ce7a64d55eb5be8d6a222c2626eed8df110c36596677043e23f3436f36b6b4713727f72024172a4d3374c324308" {
		t.Fatalf("auth signature %s differs from the document", authSig)
	}
}
