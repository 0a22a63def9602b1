package signal

import (
	"testing"
	"time"
)

// FuzzServerFrame feeds arbitrary frames to a connection's dispatcher, authenticated and
// not, and checks the server never panics and always answers or closes.
func FuzzServerFrame(f *testing.F) {
	a, b := mustID(f), mustID(f)
	info := sampleInfo()
	m := &Message{Type: TypeOffer, To: b.NodeID(), Session: "s", Info: &info}
	m.Sign(a, time.Now())
	offer, _ := m.AppendFrame(nil, 2)
	p := &Message{Type: TypePublish, Info: &info}
	p.Sign(a, time.Now())
	publish, _ := p.AppendFrame(nil, 3)
	for _, s := range [][]byte{
		offer, publish,
		[]byte(`{"id":1,"auth":{"nodeID":"` + a.NodeID().String() + `","host":"h","signature":"00"}}`),
		[]byte(`{"id":4,"lookup":{"nodeID":"` + b.NodeID().String() + `"}}`),
		[]byte(`{"id":5,"turn":{}}`),
		[]byte(`{"id":6,"relayRegister":{"endpoints":[{"transport":"udp","addr":"1.2.3.4:5"}],"capacity":3,"load":1}}`),
		[]byte(`{"id":7,"relayList":{}}`),
		[]byte(`{"id":8,"partyCreate":{"name":"lan"}}`),
		[]byte(`{"id":9,"partyJoin":{"invite":"plinv1_AAAA"}}`),
		[]byte(`{"id":10,"partyLeave":{"name":"lan"}}`),
		[]byte(`{"id":11,"partyKick":{"name":"lan","nodeID":"` + b.NodeID().String() + `"}}`),
		[]byte(`{"id":12,"partyGet":{"name":"lan"}}`),
		[]byte(`{"id":13,"partyList":{}}`),
		[]byte(`{"x":1}`),
	} {
		f.Add(s, true)
		f.Add(s, false)
	}
	srv, err := NewServer(Config{TURNSecret: "x", PingInterval: -1})
	if err != nil {
		f.Fatal(err)
	}
	defer srv.Close()
	f.Fuzz(func(t *testing.T, data []byte, authed bool) {
		c := srv.newConn(nil, "h", "fuzz")
		if authed {
			c.id = a.NodeID()
		}
		c.handle(data)
		if len(c.out) == 0 && len(c.quit) == 0 {
			t.Fatalf("frame %q got no answer and did not close the connection", data)
		}
	})
}
