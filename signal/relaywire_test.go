package signal

import (
	"bytes"
	"errors"
	"testing"
)

func TestParseRelayFrames(t *testing.T) {
	good := AppendRelayFrame(AppendRelayFrame(nil, 7, []byte("hello")), 0xfffffffe, bytes.Repeat([]byte{9}, MaxRelayPayload))
	tests := []struct {
		name    string
		msg     []byte
		frames  int
		wantErr bool
		badSess uint32 // the session the error names, when the header got that far
	}{
		{"two frames", good, 2, false, 0},
		{"empty message", nil, 0, true, 0},
		{"short header", []byte{1, 0, 0}, 0, true, 0},
		{"header only", []byte{1, 0, 0, 0, 5, 0}, 0, true, 5},
		{"unknown type", []byte{2, 0, 0, 0, 5, 0, 1, 'x'}, 0, true, 5},
		{"session zero", []byte{1, 0, 0, 0, 0, 0, 1, 'x'}, 0, true, 0},
		{"empty datagram", []byte{1, 0, 0, 0, 5, 0, 0}, 0, true, 5},
		{"over the limit", append([]byte{1, 0, 0, 0, 5, 0x20, 0x01}, make([]byte, 8193)...), 0, true, 5},
		{"truncated payload", []byte{1, 0, 0, 0, 5, 0, 4, 'a', 'b'}, 0, true, 5},
		{"good then garbage", append(AppendRelayFrame(nil, 3, []byte("a")), 1, 0), 1, true, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs, err := ParseRelayFrames(tt.msg)
			if len(fs) != tt.frames {
				t.Fatalf("%d frames, want %d", len(fs), tt.frames)
			}
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if err != nil && !errors.Is(err, ErrMalformed) {
				t.Fatalf("err = %v, want malformed", err)
			}
			if tt.wantErr && len(tt.msg) > 0 {
				rest := tt.msg
				for range tt.frames {
					_, rest, _ = nextRelayFrame(rest)
				}
				if f, _, _ := nextRelayFrame(rest); f.Session != tt.badSess {
					t.Fatalf("bad frame's session %d, want %d", f.Session, tt.badSess)
				}
			}
		})
	}
}

// FuzzRelayFrames: the decoder of binary relay messages never panics, never returns a
// payload outside the message, and what it accepts encodes back to the same bytes.
func FuzzRelayFrames(f *testing.F) {
	f.Add(AppendRelayFrame(nil, 1, []byte("x")))
	f.Add(AppendRelayFrame(AppendRelayFrame(nil, 42, make([]byte, 1200)), 43, []byte("quic")))
	f.Add([]byte{1, 0, 0, 0, 5, 0, 4, 'a', 'b'})
	f.Add([]byte{1, 0, 0, 0, 0, 0, 1, 'x'})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, msg []byte) {
		fs, err := ParseRelayFrames(msg)
		var re []byte
		for _, fr := range fs {
			if fr.Session == 0 || len(fr.Payload) == 0 || len(fr.Payload) > MaxRelayPayload {
				t.Fatalf("accepted frame %d with %d bytes", fr.Session, len(fr.Payload))
			}
			re = AppendRelayFrame(re, fr.Session, fr.Payload)
		}
		if err == nil && !bytes.Equal(re, msg) {
			t.Fatalf("re-encoding differs:\n%x\n%x", re, msg)
		}
		if err != nil && !bytes.HasPrefix(msg, re) {
			t.Fatalf("frames before the error are not a prefix")
		}
	})
}

// FuzzRelayRecords: the decoder of records between servers never panics and what it
// accepts encodes back to the same bytes.
func FuzzRelayRecords(f *testing.F) {
	a := mustID(f).NodeID()
	f.Add(appendOpenRec(nil, a, 5, "tag"))
	f.Add(appendReadyRec(nil, 6, a, 5))
	f.Add(appendCloseRec(nil, 0, a, 5, CodeRelayClosed, "bye"))
	f.Add(appendDataRec(appendDataRec(nil, 6, a, 5, []byte("x")), 7, a, 8, make([]byte, 1200)))
	f.Add([]byte{'D', 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var re []byte
		for len(b) > 0 {
			r, rest, err := nextRecord(b)
			if err != nil {
				return
			}
			switch r.kind {
			case recOpen:
				re = appendOpenRec(re, r.from, r.fromSid, r.tag)
			case recReady:
				re = appendReadyRec(re, r.toSid, r.from, r.fromSid)
			case recClose:
				re = appendCloseRec(re, r.toSid, r.from, r.fromSid, r.code, r.msg)
			case recData:
				re = appendDataRec(re, r.toSid, r.from, r.fromSid, r.payload)
			}
			if !bytes.Equal(re, b[:len(b)-len(rest)]) {
				t.Fatalf("record %q re-encodes differently", r.kind)
			}
			re = re[:0]
			b = rest
		}
	})
}

// FuzzServerRelay feeds arbitrary binary messages to an authenticated connection's relay
// handler: it never panics, and every message gets an answer (a fresh connection has no
// sessions, so even well-formed frames are for sessions never opened).
func FuzzServerRelay(f *testing.F) {
	f.Add(AppendRelayFrame(nil, 1, []byte("x")))
	f.Add([]byte{1, 0, 0, 0, 5, 0, 4, 'a', 'b'})
	f.Add([]byte{})
	srv, err := NewServer(Config{PingInterval: -1})
	if err != nil {
		f.Fatal(err)
	}
	defer srv.Close()
	a := mustID(f)
	f.Fuzz(func(t *testing.T, msg []byte) {
		c := srv.newConn(nil, "h", "fuzz")
		c.id = a.NodeID()
		c.relayData(msg)
		if len(c.out) == 0 && len(c.quit) == 0 {
			t.Fatalf("relay message %x got no answer", msg)
		}
	})
}
