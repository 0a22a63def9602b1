package stuntest_test

import (
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"peerlink/stun"
	"peerlink/stun/stuntest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestStart(t *testing.T) {
	for _, opts := range []stuntest.Options{
		{},
		{RFC5780: true, Config: stun.Config{TCP: true}},
	} {
		s := stuntest.Start(t, opts)
		if s.UDPAddr(0).Addr().String() != "127.0.0.1" || s.RFC5780() != opts.RFC5780 {
			t.Fatalf("%+v: primary %v, RFC 5780 %v", opts, s.UDPAddr(0), s.RFC5780())
		}
		if opts.RFC5780 && s.UDPAddr(stun.ChangeIP).Addr() != stuntest.AltIP {
			t.Errorf("alternate IP %v, want %v", s.UDPAddr(stun.ChangeIP), stuntest.AltIP)
		}
		if s.TCPAddr().IsValid() != opts.Config.TCP {
			t.Errorf("TCP address %v with TCP %v", s.TCPAddr(), opts.Config.TCP)
		}
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		id := stun.NewTransactionID()
		if _, err := c.WriteToUDPAddrPort(stun.AppendBindingRequest(nil, id, stun.RequestOptions{}), s.UDPAddr(0)); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		r, err := stun.ParseBindingResponse(buf[:n])
		if err != nil || r.TransactionID != id || r.Mapped.String() != c.LocalAddr().String() {
			t.Errorf("answer %+v, %v", r, err)
		}
	}
}
