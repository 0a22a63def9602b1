package probe

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
)

func TestMessageRoundTrip(t *testing.T) {
	tx := [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	tests := []struct {
		name string
		m    Message
		size int
	}{
		{"request", Message{TxID: tx}, RequestLen},
		{"request change both", Message{TxID: tx, ChangeIP: true, ChangePort: true}, RequestLen},
		{"response v4", Message{Response: true, ChangePort: true, TxID: tx,
			Observed: netip.MustParseAddrPort("203.0.113.20:40000"),
			Origin:   netip.MustParseAddrPort("203.0.113.10:3479")}, headerLen + 14},
		{"response v6", Message{Response: true, TxID: tx,
			Observed: netip.MustParseAddrPort("[2001:db8::1]:1"),
			Origin:   netip.MustParseAddrPort("[2001:db8::2]:65535")}, maxResponseLen},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.m.Append(nil)
			if len(b) != tt.size {
				t.Fatalf("encoded %d bytes, want %d", len(b), tt.size)
			}
			got, err := Parse(b)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.m {
				t.Fatalf("round trip: got %+v, want %+v", got, tt.m)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	resp := Message{Response: true, Observed: netip.MustParseAddrPort("192.0.2.1:5"), Origin: netip.MustParseAddrPort("192.0.2.2:6")}.Append(nil)
	req := Message{}.Append(nil)
	mut := func(b []byte, i int, v byte) []byte {
		c := bytes.Clone(b)
		c[i] = v
		return c
	}
	tests := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short header", resp[:headerLen-1]},
		{"bad magic", mut(resp, 0, 'X')},
		{"bad version", mut(resp, 4, 2)},
		{"bad kind", mut(resp, 5, 9)},
		{"unknown flag", mut(resp, 6, 0x80)},
		{"reserved set", mut(resp, 7, 1)},
		{"short request", req[:RequestLen-1]},
		{"truncated address", resp[:len(resp)-1]},
		{"no origin", resp[:headerLen+7]},
		{"bad family", mut(resp, headerLen, 5)},
		{"trailing bytes", append(bytes.Clone(resp), 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if m, err := Parse(tt.b); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Parse = %+v, %v; want ErrMalformed", m, err)
			}
		})
	}
}

// FuzzParse checks Parse never panics and that whatever it accepts re-encodes to a
// message that parses to the same value.
func FuzzParse(f *testing.F) {
	f.Add(Message{ChangeIP: true}.Append(nil))
	f.Add(Message{Response: true, Observed: netip.MustParseAddrPort("192.0.2.1:5"), Origin: netip.MustParseAddrPort("192.0.2.2:6")}.Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			return
		}
		// The encoder writes IPv4-mapped IPv6 addresses in their IPv4 form.
		m.Observed = netip.AddrPortFrom(m.Observed.Addr().Unmap(), m.Observed.Port())
		m.Origin = netip.AddrPortFrom(m.Origin.Addr().Unmap(), m.Origin.Port())
		m2, err := Parse(m.Append(nil))
		if err != nil {
			t.Fatalf("re-encoded message does not parse: %v", err)
		}
		if m2 != m {
			t.Fatalf("round trip: %+v != %+v", m2, m)
		}
		if m.Response && len(b) > maxResponseLen {
			t.Fatalf("accepted a %d-byte response, larger than any valid one", len(b))
		}
	})
}
