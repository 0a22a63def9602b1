package detect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/pion/stun/v3"

	"peerlink/clock"
)

// answer is what one Binding transaction learned.
type answer struct {
	mapped netip.AddrPort // XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from RFC 3489 servers
	other  netip.AddrPort // OTHER-ADDRESS: the server's alternate IP and port, if any
	origin netip.AddrPort // where the response came from
	rtt    time.Duration
	code   int // STUN error code for error responses, else 0
}

// prober is one UDP socket used for Binding transactions. A single reader goroutine
// hands responses to the transaction waiting for them, so several tests can share the
// socket, which is what comparing their mapped addresses requires.
type prober struct {
	clock clock.Clock
	conn  net.PacketConn
	local netip.AddrPort

	mu      sync.Mutex
	pending map[[stun.TransactionIDSize]byte]chan answerOrErr
	// hairpin is the transaction ID of a request this socket sent to its own public
	// address; hairpinned is closed when that request comes back to it.
	hairpin    [stun.TransactionIDSize]byte
	hairpinned chan struct{}

	done chan struct{}
}

type answerOrErr struct {
	a   answer
	err error
}

func newProber(c clock.Clock, conn net.PacketConn) *prober {
	p := &prober{
		clock:      c,
		conn:       conn,
		local:      addrPortOf(conn.LocalAddr()),
		pending:    make(map[[stun.TransactionIDSize]byte]chan answerOrErr),
		hairpinned: make(chan struct{}),
		done:       make(chan struct{}),
	}
	go p.readLoop()
	return p
}

// close closes the socket and waits for the reader.
func (p *prober) close() {
	p.conn.Close()
	<-p.done
}

func (p *prober) readLoop() {
	defer close(p.done)
	buf := make([]byte, 1500)
	for {
		n, from, err := p.conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		p.handle(buf[:n], addrPortOf(from))
	}
}

func (p *prober) handle(b []byte, from netip.AddrPort) {
	if !stun.IsMessage(b) {
		return
	}
	m := &stun.Message{Raw: append([]byte(nil), b...)}
	if err := m.Decode(); err != nil {
		return
	}
	p.mu.Lock()
	if m.Type.Class == stun.ClassRequest {
		if m.TransactionID == p.hairpin {
			select {
			case <-p.hairpinned:
			default:
				close(p.hairpinned)
			}
		}
		p.mu.Unlock()
		return
	}
	ch, ok := p.pending[m.TransactionID]
	p.mu.Unlock()
	if !ok {
		return
	}
	var r answerOrErr
	r.a.origin = from
	switch m.Type.Class {
	case stun.ClassErrorResponse:
		var ec stun.ErrorCodeAttribute
		if err := ec.GetFrom(m); err == nil {
			r.a.code = int(ec.Code)
		} else {
			r.a.code = 400
		}
	case stun.ClassSuccessResponse:
		var xa stun.XORMappedAddress
		if err := xa.GetFrom(m); err == nil {
			r.a.mapped = addrPortFromIP(xa.IP, xa.Port)
		} else {
			var ma stun.MappedAddress
			if err := ma.GetFrom(m); err != nil {
				r.err = fmt.Errorf("response from %v has no mapped address", from)
			} else {
				r.a.mapped = addrPortFromIP(ma.IP, ma.Port)
			}
		}
		var oa stun.OtherAddress
		if err := oa.GetFrom(m); err == nil {
			r.a.other = addrPortFromIP(oa.IP, oa.Port)
		}
		var ro stun.ResponseOrigin
		if err := ro.GetFrom(m); err == nil {
			r.a.origin = addrPortFromIP(ro.IP, ro.Port)
		}
	default:
		return
	}
	select {
	case ch <- r:
	default: // a retransmission already answered
	}
}

// changeRequest is the RFC 5780 CHANGE-REQUEST attribute.
type changeRequest struct{ ip, port bool }

func (c changeRequest) AddTo(m *stun.Message) error {
	var v [4]byte
	if c.ip {
		v[3] |= 0x04
	}
	if c.port {
		v[3] |= 0x02
	}
	m.Add(stun.AttrChangeRequest, v[:])
	return nil
}

// errNoAnswer means every retransmission went unanswered before the deadline.
var errNoAnswer = errors.New("no answer")

// roundTrip sends a Binding request to dst and retransmits it every rto until an
// answer arrives or ctx ends. Filtering tests rely on "no answer" being a result, so the
// caller bounds how long that takes through ctx.
func (p *prober) roundTrip(ctx context.Context, dst netip.AddrPort, change changeRequest, rto time.Duration) (answer, error) {
	return p.roundTripNotify(ctx, dst, change, rto, nil)
}

// roundTripNotify is roundTrip that closes sent (if not nil) after the first transmission.
func (p *prober) roundTripNotify(ctx context.Context, dst netip.AddrPort, change changeRequest, rto time.Duration, sent chan struct{}) (answer, error) {
	setters := []stun.Setter{stun.TransactionID, stun.BindingRequest}
	if change.ip || change.port {
		setters = append(setters, change)
	}
	setters = append(setters, stun.Fingerprint)
	m, err := stun.Build(setters...)
	if err != nil {
		return answer{}, err
	}
	ch := make(chan answerOrErr, 1)
	p.mu.Lock()
	p.pending[m.TransactionID] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.pending, m.TransactionID)
		p.mu.Unlock()
	}()
	to := net.UDPAddrFromAddrPort(dst)
	start := p.clock.Now()
	for {
		_, err := p.conn.WriteTo(m.Raw, to)
		if sent != nil {
			close(sent)
			sent = nil
		}
		if err != nil {
			return answer{}, fmt.Errorf("binding to %v: %w", dst, err)
		}
		tick := make(chan struct{})
		t := p.clock.AfterFunc(rto, func() { close(tick) })
		select {
		case <-ctx.Done():
			t.Stop()
			return answer{}, fmt.Errorf("binding to %v: %w", dst, errNoAnswer)
		case r := <-ch:
			t.Stop()
			r.a.rtt = p.clock.Now().Sub(start)
			return r.a, r.err
		case <-tick:
			// RFC 8489 doubles the interval; here the whole detection has a budget of a
			// few round trips, so the interval grows only gently.
			rto += rto / 2
		}
	}
}

// sendHairpin sends a Binding request to this socket's own public address. If the NAT
// hairpins, the request arrives back here and hairpinned closes.
func (p *prober) sendHairpin(public netip.AddrPort) error {
	m, err := stun.Build(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.hairpin = m.TransactionID
	p.mu.Unlock()
	_, err = p.conn.WriteTo(m.Raw, net.UDPAddrFromAddrPort(public))
	return err
}

func addrPortOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.UDPAddr:
		return addrPortFromIP(a.IP, a.Port)
	case interface{ AddrPort() netip.AddrPort }:
		return a.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

func addrPortFromIP(ip net.IP, port int) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), uint16(port))
}
