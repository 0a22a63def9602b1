package stun

import (
	"bytes"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	pion "github.com/pion/stun/v3"
)

// handled is the outcome of one handle call.
type handled struct {
	resp []byte
	from int
	to   netip.AddrPort
	ok   bool
	c    *counters
}

func handleOnce(w *worker, msg []byte, src netip.AddrPort, on int, tcp bool) handled {
	resp := newResponse()
	from, to, ok := w.handle(msg, src, on, tcp, 0, resp)
	return handled{resp: slices.Clone(resp.Raw), from: from, to: to, ok: ok, c: w.c}
}

func TestHandleAnswers(t *testing.T) {
	v6client := netip.MustParseAddrPort("[2001:db8::1]:5000")
	overrun := request()
	overrun.attrs = []byte{0x00, 0x06, 0x00, 0x64, 'a', 'b', 'c', 'd'}
	overrunClassic := request()
	overrunClassic.classic = true
	overrunClassic.attrs = overrun.attrs
	manyUnknown := request()
	for i := range 40 {
		manyUnknown.attr(0x7000+uint16(i), nil)
	}

	type want struct {
		code    int      // 0: success
		attrs   []uint16 // exact attribute types of the answer
		from    int
		origin  netip.AddrPort
		other   netip.AddrPort
		unknown []uint16
		counter counter
	}
	tests := []struct {
		name string
		opts handlerOpts
		msg  *msgBuilder
		on   int
		tcp  bool
		src  netip.AddrPort
		want want
	}{
		{
			name: "single address",
			opts: handlerOpts{single: true},
			msg:  &msgBuilder{typ: typeBindingRequest, fp: true},
			want: want{attrs: []uint16{attrXORMappedAddress, attrFingerprint}, counter: cResponses},
		},
		{
			name: "single address, request without FINGERPRINT, SOFTWARE",
			opts: handlerOpts{single: true, software: "peerlink test"},
			msg:  request(),
			want: want{attrs: []uint16{attrXORMappedAddress, attrSoftware, attrFingerprint}, counter: cResponses},
		},
		{
			name: "single address, IPv6 client",
			opts: handlerOpts{single: true},
			msg:  request(),
			src:  v6client,
			want: want{attrs: []uint16{attrXORMappedAddress, attrFingerprint}, counter: cResponses},
		},
		{
			name: "rfc5780 without CHANGE-REQUEST",
			msg:  request().fpOn(),
			want: want{
				attrs:  []uint16{attrXORMappedAddress, attrMappedAddress, attrResponseOrigin, attrOtherAddress, attrFingerprint},
				origin: testAddrs[0], other: testAddrs[3], counter: cResponses,
			},
		},
		{
			name: "rfc5780 on the alternate IP, change port",
			msg:  request().change(ChangePort),
			on:   2,
			want: want{
				attrs: []uint16{attrXORMappedAddress, attrMappedAddress, attrResponseOrigin, attrOtherAddress, attrFingerprint},
				from:  3, origin: testAddrs[3], other: testAddrs[1], counter: cResponses,
			},
		},
		{
			name: "rfc5780 over TCP: no RFC 5780 attributes",
			msg:  request(),
			tcp:  true,
			want: want{attrs: []uint16{attrXORMappedAddress, attrFingerprint}, counter: cResponses},
		},
		{
			name: "RFC 3489 client",
			msg:  request().classicOn().change(0),
			want: want{
				attrs:  []uint16{attrMappedAddress, attrSourceAddress, attrChangedAddress},
				origin: testAddrs[0], other: testAddrs[3], counter: cResponses,
			},
		},
		{
			name: "RFC 3489 client, change IP, SOFTWARE padded",
			opts: handlerOpts{software: "peer-link"},
			msg:  request().classicOn().change(ChangeIP),
			want: want{
				attrs: []uint16{attrMappedAddress, attrSourceAddress, attrChangedAddress, attrSoftware},
				from:  2, origin: testAddrs[2], other: testAddrs[3], counter: cResponses,
			},
		},
		{
			name: "RFC 3489 client, single address, no flags",
			opts: handlerOpts{single: true},
			msg:  request().classicOn().change(0),
			want: want{attrs: []uint16{attrMappedAddress, attrSourceAddress}, origin: testAddrs[0], counter: cResponses},
		},
		{
			name: "ICE connectivity check attributes are understood",
			opts: handlerOpts{single: true},
			msg: request().attr(attrPriority, []byte{1, 2, 3, 4}).attr(attrUseCandidate, nil).
				attr(0x802A, make([]byte, 8)).attr(attrUsername, []byte("a:b")).
				attr(attrMessageIntegrity, make([]byte, 20)).fpOn(),
			want: want{attrs: []uint16{attrXORMappedAddress, attrFingerprint}, counter: cResponses},
		},
		{
			name: "attributes after MESSAGE-INTEGRITY are ignored",
			opts: handlerOpts{single: true},
			msg:  request().attr(attrMessageIntegrity, make([]byte, 20)).attr(0x7777, nil),
			want: want{attrs: []uint16{attrXORMappedAddress, attrFingerprint}, counter: cResponses},
		},
		{
			name: "unknown comprehension-optional attribute is ignored",
			opts: handlerOpts{single: true},
			msg:  request().attr(0xC001, []byte("x")),
			want: want{attrs: []uint16{attrXORMappedAddress, attrFingerprint}, counter: cResponses},
		},
		{
			name: "PADDING is understood and not echoed",
			msg:  request().attr(attrPadding, make([]byte, 1200)).change(ChangeIP | ChangePort),
			want: want{
				attrs: []uint16{attrXORMappedAddress, attrMappedAddress, attrResponseOrigin, attrOtherAddress, attrFingerprint},
				from:  3, origin: testAddrs[3], other: testAddrs[3], counter: cResponses,
			},
		},
		{
			name: "same IP as the server, other port, is a client",
			opts: handlerOpts{single: true},
			msg:  request(),
			src:  netip.MustParseAddrPort("192.0.2.1:5000"),
			want: want{attrs: []uint16{attrXORMappedAddress, attrFingerprint}, counter: cResponses},
		},

		{
			name: "420 unknown comprehension-required attributes, deduplicated",
			msg: request().attr(0x7777, nil).attr(attrResponseAddress, make([]byte, 8)).
				attr(0x7777, []byte("again")).fpOn(),
			want: want{
				code: 420, attrs: []uint16{attrErrorCode, attrUnknownAttributes, attrFingerprint},
				unknown: []uint16{0x7777, attrResponseAddress}, counter: cUnknownAttr,
			},
		},
		{
			name: "420 lists at most 16",
			msg:  manyUnknown,
			want: want{
				code: 420, attrs: []uint16{attrErrorCode, attrUnknownAttributes, attrFingerprint},
				unknown: []uint16{0x7000, 0x7001, 0x7002, 0x7003, 0x7004, 0x7005, 0x7006, 0x7007,
					0x7008, 0x7009, 0x700a, 0x700b, 0x700c, 0x700d, 0x700e, 0x700f},
				counter: cUnknownAttr,
			},
		},
		{
			name: "420 to an RFC 3489 client repeats an odd last entry",
			msg:  request().classicOn().attr(0x7777, nil),
			want: want{
				code: 420, attrs: []uint16{attrErrorCode, attrUnknownAttributes},
				unknown: []uint16{0x7777, 0x7777}, counter: cUnknownAttr,
			},
		},
		{
			name: "420 CHANGE-REQUEST on a single address",
			opts: handlerOpts{single: true},
			msg:  request().change(ChangeIP),
			want: want{
				code: 420, attrs: []uint16{attrErrorCode, attrUnknownAttributes, attrFingerprint},
				unknown: []uint16{attrChangeRequest}, counter: cUnknownAttr,
			},
		},
		{
			name: "420 CHANGE-REQUEST without flags on a single address",
			opts: handlerOpts{single: true},
			msg:  request().change(0),
			want: want{
				code: 420, attrs: []uint16{attrErrorCode, attrUnknownAttributes, attrFingerprint},
				unknown: []uint16{attrChangeRequest}, counter: cUnknownAttr,
			},
		},
		{
			name: "420 RFC 3489 client asking a single address for a change",
			opts: handlerOpts{single: true},
			msg:  request().classicOn().change(ChangePort),
			want: want{
				code: 420, attrs: []uint16{attrErrorCode, attrUnknownAttributes},
				unknown: []uint16{attrChangeRequest, attrChangeRequest}, counter: cUnknownAttr,
			},
		},
		{
			name: "420 CHANGE-REQUEST over TCP",
			msg:  request().change(ChangePort),
			tcp:  true,
			want: want{
				code: 420, attrs: []uint16{attrErrorCode, attrUnknownAttributes, attrFingerprint},
				unknown: []uint16{attrChangeRequest}, counter: cUnknownAttr,
			},
		},
		{
			name: "400 CHANGE-REQUEST of the wrong size",
			msg:  request().attr(attrChangeRequest, []byte{0, 0, 6}),
			want: want{code: 400, attrs: []uint16{attrErrorCode, attrFingerprint}, counter: cBadRequest},
		},
		{
			name: "400 attribute overruns the message",
			msg:  overrun,
			want: want{code: 400, attrs: []uint16{attrErrorCode, attrFingerprint}, counter: cBadRequest},
		},
		{
			name: "400 to an RFC 3489 client",
			msg:  overrunClassic,
			want: want{code: 400, attrs: []uint16{attrErrorCode}, counter: cBadRequest},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newTestWorker(tt.opts)
			src := tt.src
			if !src.IsValid() {
				src = testClient
			}
			msg := tt.msg.bytes()
			got := handleOnce(w, msg, src, tt.on, tt.tcp)
			if !got.ok {
				t.Fatalf("no answer")
			}
			if got.from != tt.want.from {
				t.Errorf("answered from socket %d, want %d", got.from, tt.want.from)
			}
			if types := attrTypes(t, got.resp); !slices.Equal(types, tt.want.attrs) {
				t.Errorf("attributes %#04x, want %#04x", types, tt.want.attrs)
			}
			if !bytes.Equal(got.resp[4:20], msg[4:20]) {
				t.Errorf("transaction ID % x, want % x", got.resp[4:20], msg[4:20])
			}
			if got.c.c[tt.want.counter].Load() != 1 || got.c.c[cRequests].Load() != 1 || got.c.c[cReceived].Load() != 1 {
				t.Errorf("counters %v, want received, requests and %d at 1", got.c.snapshot(), tt.want.counter)
			}
			r, err := parseBindingResponse(got.resp, tt.msg.classic)
			if tt.want.code != 0 {
				var re *ResponseError
				if !errors.As(err, &re) {
					t.Fatalf("parse: %v, want an error response", err)
				}
				if re.Code != tt.want.code || !slices.Equal(re.Unknown, tt.want.unknown) {
					t.Errorf("error %d %#04x, want %d %#04x", re.Code, re.Unknown, tt.want.code, tt.want.unknown)
				}
				if tt.msg.classic && len(re.Reason)%4 != 0 {
					t.Errorf("reason %q is not padded to four bytes for an RFC 3489 client", re.Reason)
				}
				return
			}
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if r.Mapped != src {
				t.Errorf("mapped %v, want %v", r.Mapped, src)
			}
			if r.MappedXOR == tt.msg.classic {
				t.Errorf("MappedXOR %v for classic=%v", r.MappedXOR, tt.msg.classic)
			}
			if r.Origin != tt.want.origin || r.Other != tt.want.other {
				t.Errorf("origin %v other %v, want %v %v", r.Origin, r.Other, tt.want.origin, tt.want.other)
			}
			if sw := tt.opts.software; sw != "" {
				if tt.msg.classic {
					if len(r.Software)%4 != 0 || r.Software[:len(sw)] != sw {
						t.Errorf("software %q for an RFC 3489 client, want %q padded", r.Software, sw)
					}
				} else if r.Software != sw {
					t.Errorf("software %q, want %q", r.Software, sw)
				}
			}
		})
	}
}

func (m *msgBuilder) fpOn() *msgBuilder      { m.fp = true; return m }
func (m *msgBuilder) classicOn() *msgBuilder { m.classic = true; return m }

// TestHandleChangeMatrix checks RFC 5780 section 6.1's table for requests arriving on each
// of the four sockets: the answer comes from the socket the flags select, says so in
// RESPONSE-ORIGIN, and OTHER-ADDRESS is the receiving socket's opposite.
func TestHandleChangeMatrix(t *testing.T) {
	for on := range 4 {
		for _, c := range []ChangeRequest{0, ChangePort, ChangeIP, ChangeIP | ChangePort} {
			w := newTestWorker(handlerOpts{})
			got := handleOnce(w, request().change(c).fpOn().bytes(), testClient, on, false)
			r, err := ParseBindingResponse(got.resp)
			if err != nil {
				t.Fatalf("on %d change %v: %v", on, c, err)
			}
			wantFrom := testAddrs[on]
			if c&ChangeIP != 0 {
				wantFrom = netip.AddrPortFrom(testAddrs[on^2].Addr(), wantFrom.Port())
			}
			if c&ChangePort != 0 {
				wantFrom = netip.AddrPortFrom(wantFrom.Addr(), testAddrs[on^1].Port())
			}
			if testAddrs[got.from] != wantFrom || r.Origin != wantFrom {
				t.Errorf("on %v change %v: from %v origin %v, want %v", testAddrs[on], c, testAddrs[got.from], r.Origin, wantFrom)
			}
			if r.Other != testAddrs[on^3] {
				t.Errorf("on %v: OTHER-ADDRESS %v, want %v", testAddrs[on], r.Other, testAddrs[on^3])
			}
			if r.Mapped != testClient || r.PlainMapped != testClient {
				t.Errorf("mapped %v plain %v, want %v", r.Mapped, r.PlainMapped, testClient)
			}
			if changed := w.c.c[cChanged].Load() == 1; changed != (c != 0) {
				t.Errorf("change %v counted as changed=%v", c, changed)
			}
		}
	}
}

// TestHandleSilence covers the input the RFC says to drop, and answers the abuse rules
// forbid.
func TestHandleSilence(t *testing.T) {
	valid := request().bytes()
	fpNotLast := request().fpOn().bytes()
	fpNotLast = append(fpNotLast, 0x80, 0x22, 0, 0) // SOFTWARE after FINGERPRINT
	be.PutUint16(fpNotLast[2:4], uint16(len(fpNotLast)-headerSize))
	typed := func(typ uint16) []byte { m := request(); m.typ = typ; return m.bytes() }

	tests := []struct {
		name    string
		msg     []byte
		src     netip.AddrPort
		counter counter
	}{
		{"empty", nil, testClient, cNotSTUN},
		{"short header", valid[:19], testClient, cNotSTUN},
		{"top bits set", append([]byte{0xC0}, valid[1:]...), testClient, cNotSTUN},
		{"length not a multiple of four", append(slices.Clone(valid[:2]), append([]byte{0, 2}, append(valid[4:], 0, 0)...)...), testClient, cNotSTUN},
		{"trailing bytes", append(slices.Clone(valid), 0, 0, 0, 0), testClient, cNotSTUN},
		{"truncated", request().attr(attrSoftware, []byte("abcd")).bytes()[:24], testClient, cNotSTUN},
		{"bad FINGERPRINT", (&msgBuilder{typ: typeBindingRequest, badFP: true}).bytes(), testClient, cNotSTUN},
		{"FINGERPRINT not last", fpNotLast, testClient, cNotSTUN},
		{"DTLS record", append([]byte{22, 254, 253}, make([]byte, 40)...), testClient, cNotSTUN},
		{"RTP packet", append([]byte{0x80, 0x60}, make([]byte, 30)...), testClient, cNotSTUN},
		{"Binding indication", typed(0x0011), testClient, cIgnored},
		{"Binding success response", typed(typeBindingSuccess), testClient, cIgnored},
		{"Binding error response", typed(typeBindingError), testClient, cIgnored},
		{"Allocate request", typed(0x0003), testClient, cIgnored},
		{"to port 0", valid, netip.MustParseAddrPort("203.0.113.9:0"), cForbidden},
		{"to 0.0.0.0", valid, netip.MustParseAddrPort("0.0.0.0:4000"), cForbidden},
		{"to multicast", valid, netip.MustParseAddrPort("224.0.0.1:4000"), cForbidden},
		{"to IPv6 multicast", valid, netip.MustParseAddrPort("[ff02::1]:4000"), cForbidden},
		{"to broadcast", valid, netip.MustParseAddrPort("255.255.255.255:4000"), cForbidden},
		{"to the primary socket", valid, testAddrs[0], cForbidden},
		{"to the alternate socket", valid, testAddrs[3], cForbidden},
		{"to the alternate IP, primary port", valid, testAddrs[2], cForbidden},
		{"error answer to the server itself", request().attr(0x7777, nil).bytes(), testAddrs[1], cForbidden},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newTestWorker(handlerOpts{})
			got := handleOnce(w, tt.msg, tt.src, 0, false)
			if got.ok {
				t.Fatalf("answered % x", got.resp)
			}
			if w.c.c[tt.counter].Load() != 1 || w.c.c[cReceived].Load() != 1 {
				t.Errorf("counters %v, want received and %d at 1", w.c.snapshot(), tt.counter)
			}
		})
	}
}

func TestHandleRateLimit(t *testing.T) {
	w := newTestWorker(handlerOpts{rateLimit: RateLimit{Rate: 1, Burst: 10, ChangeCost: 4}})
	plain := request().bytes()
	change := request().change(ChangeIP).bytes()
	resp := newResponse()
	var now int64
	answered := func(msg []byte, src netip.AddrPort) bool {
		_, _, ok := w.handle(msg, src, 0, false, now, resp)
		return ok
	}
	// Burst 10: two changes (8 tokens) and two plain requests, then nothing.
	for i, msg := range [][]byte{change, change, plain, plain} {
		if !answered(msg, testClient) {
			t.Fatalf("request %d refused within the burst", i)
		}
	}
	if answered(plain, testClient) {
		t.Fatal("answered beyond the burst")
	}
	// The same IP from another port shares the bucket; another IP has its own.
	if answered(plain, netip.AddrPortFrom(testClient.Addr(), 1234)) {
		t.Error("another port of the same IP has a fresh bucket")
	}
	if !answered(plain, netip.MustParseAddrPort("203.0.113.10:40000")) {
		t.Error("another IP was refused")
	}
	// Three seconds earn three tokens: a plain request yes, a change (4) no.
	now += int64(3 * time.Second)
	if !answered(plain, testClient) {
		t.Error("refused after refill")
	}
	if answered(change, testClient) {
		t.Error("CHANGE-REQUEST answered with 2 tokens, it costs 4")
	}
	for i, want := range []bool{true, true, false} {
		if answered(plain, testClient) != want {
			t.Errorf("request %d with two tokens left: answered %v", i, !want)
		}
	}
	if n := w.c.c[cRateLimited].Load(); n != 4 {
		t.Errorf("rate-limited counter %d, want 4", n)
	}
	// IPv6 sources share a bucket per /64.
	for i := range 10 {
		src := netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)}), 5000)
		if !answered(plain, src) {
			t.Fatalf("IPv6 request %d refused within the burst", i)
		}
	}
	if answered(plain, netip.MustParseAddrPort("[2001:db8::ffff:1]:5000")) {
		t.Error("another address of the same /64 got a fresh bucket")
	}
}

// TestHandleNoAllocs checks that no answer, silence included, allocates.
func TestHandleNoAllocs(t *testing.T) {
	msgs := map[string][]byte{
		"success":       request().fpOn().bytes(),
		"change":        request().change(ChangeIP | ChangePort).bytes(),
		"classic":       request().classicOn().change(ChangePort).bytes(),
		"unknown":       request().attr(0x7777, nil).attr(0x7778, nil).bytes(),
		"bad request":   request().attr(attrChangeRequest, nil).bytes(),
		"not STUN":      []byte("GET / HTTP/1.1\r\n\r\n\r\n"),
		"IPv6 response": request().bytes(),
	}
	w := newTestWorker(handlerOpts{software: "peerlink", rateLimit: RateLimit{Rate: 1e9, Burst: 1e9}})
	resp := newResponse()
	for name, msg := range msgs {
		src := testClient
		if name == "IPv6 response" {
			src = netip.MustParseAddrPort("[2001:db8::1]:5000")
		}
		allocs := testing.AllocsPerRun(100, func() {
			w.handle(msg, src, 0, false, 1, resp)
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per request", name, allocs)
		}
	}
}

func TestAppendBindingRequestRoundTrip(t *testing.T) {
	id := NewTransactionID()
	for _, opts := range []RequestOptions{
		{},
		{Change: ChangeIP},
		{Change: ChangePort, Software: "detector"},
		{Change: ChangeIP | ChangePort, NoFingerprint: true},
	} {
		req := AppendBindingRequest([]byte("prefix"), id, opts)
		if string(req[:6]) != "prefix" {
			t.Fatalf("prefix lost")
		}
		req = req[6:]
		m := new(pion.Message)
		if err := pion.Decode(req, m); err != nil {
			t.Fatalf("%+v: pion cannot decode: %v", opts, err)
		}
		if m.Type != pion.BindingRequest || m.TransactionID != id {
			t.Errorf("%+v: type %v id %x", opts, m.Type, m.TransactionID)
		}
		if err := pion.Fingerprint.Check(m); (err == nil) == opts.NoFingerprint {
			t.Errorf("%+v: fingerprint check %v", opts, err)
		}
		w := newTestWorker(handlerOpts{})
		got := handleOnce(w, req, testClient, 0, false)
		r, err := ParseBindingResponse(got.resp)
		if err != nil {
			t.Fatalf("%+v: %v", opts, err)
		}
		if r.TransactionID != id || r.Mapped != testClient || r.Origin != testAddrs[opts.Change.socket()] {
			t.Errorf("%+v: answer %+v", opts, r)
		}
	}
}

func TestResponsePort(t *testing.T) {
	port := func(p uint16) []byte { return []byte{byte(p >> 8), byte(p), 0, 0} }
	tests := []struct {
		name    string
		msg     *msgBuilder
		tcp     bool
		wantTo  netip.AddrPort
		code    int
		silence bool
	}{
		{"answer goes to the source IP at the asked port", request().attr(attrResponsePort, port(4242)).fpOn(), false,
			netip.AddrPortFrom(testClient.Addr(), 4242), 0, false},
		{"port zero is a bad request", request().attr(attrResponsePort, port(0)).fpOn(), false, testClient, 400, false},
		{"short value is a bad request", request().attr(attrResponsePort, []byte{1}).fpOn(), false, testClient, 400, false},
		{"over TCP it is refused with 420", request().attr(attrResponsePort, port(4242)).fpOn(), true, testClient, 420, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newTestWorker(handlerOpts{single: true})
			got := handleOnce(w, tt.msg.bytes(), testClient, 0, tt.tcp)
			if !got.ok {
				t.Fatal("no answer")
			}
			if got.to != tt.wantTo {
				t.Errorf("answer to %v, want %v", got.to, tt.wantTo)
			}
			r, err := ParseBindingResponse(got.resp)
			var re *ResponseError
			switch {
			case tt.code == 0 && err != nil:
				t.Fatalf("parse: %v", err)
			case tt.code == 0 && r.Mapped != testClient:
				t.Errorf("mapped %v, want the request's source %v", r.Mapped, testClient)
			case tt.code != 0 && (!errors.As(err, &re) || re.Code != tt.code):
				t.Errorf("answer %v, want error %d", err, tt.code)
			}
		})
	}
}
