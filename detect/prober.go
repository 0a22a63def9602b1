package detect

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"peerlink/clock"
	"peerlink/stun"
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
	pending map[stun.TransactionID]chan answerOrErr
	// hairpin is the transaction ID of a request this socket sent to its own public
	// address; hairpinned is closed when that request comes back to it.
	hairpin    stun.TransactionID
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
		pending:    make(map[stun.TransactionID]chan answerOrErr),
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
	if binary.BigEndian.Uint16(b) == bindingRequest {
		// Our own hairpin probe coming back is the only request this socket expects.
		var id stun.TransactionID
		copy(id[:], b[8:20])
		p.mu.Lock()
		if id == p.hairpin {
			select {
			case <-p.hairpinned:
			default:
				close(p.hairpinned)
			}
		}
		p.mu.Unlock()
		return
	}
	resp, err := stun.ParseBindingResponse(b)
	var re *stun.ResponseError
	if err != nil && !errors.As(err, &re) {
		return // not a Binding response: not ours
	}
	p.mu.Lock()
	ch, ok := p.pending[resp.TransactionID]
	p.mu.Unlock()
	if !ok {
		return
	}
	r := answerOrErr{a: answer{mapped: resp.Mapped, other: resp.Other, origin: from}}
	if resp.Origin.IsValid() {
		r.a.origin = resp.Origin
	}
	switch {
	case re != nil:
		r.a.code = re.Code
	case !resp.Mapped.IsValid():
		r.err = fmt.Errorf("response from %v has no mapped address", from)
	}
	select {
	case ch <- r:
	default: // a retransmission already answered
	}
}

const bindingRequest = 0x0001

// errNoAnswer means every retransmission went unanswered before the deadline.
var errNoAnswer = errors.New("no answer")

// roundTrip sends a Binding request to dst and retransmits it every rto until an
// answer arrives or ctx ends. Filtering tests rely on "no answer" being a result, so the
// caller bounds how long that takes through ctx.
func (p *prober) roundTrip(ctx context.Context, dst netip.AddrPort, change stun.ChangeRequest, rto time.Duration) (answer, error) {
	return p.roundTripNotify(ctx, dst, change, rto, nil)
}

// roundTripNotify is roundTrip that closes sent (if not nil) after the first transmission.
func (p *prober) roundTripNotify(ctx context.Context, dst netip.AddrPort, change stun.ChangeRequest, rto time.Duration, sent chan struct{}) (answer, error) {
	id := stun.NewTransactionID()
	raw := stun.AppendBindingRequest(nil, id, stun.RequestOptions{Change: change})
	ch := make(chan answerOrErr, 1)
	p.mu.Lock()
	p.pending[id] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.pending, id)
		p.mu.Unlock()
	}()
	to := net.UDPAddrFromAddrPort(dst)
	start := p.clock.Now()
	for {
		_, err := p.conn.WriteTo(raw, to)
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
	id := stun.NewTransactionID()
	p.mu.Lock()
	p.hairpin = id
	p.mu.Unlock()
	_, err := p.conn.WriteTo(stun.AppendBindingRequest(nil, id, stun.RequestOptions{}), net.UDPAddrFromAddrPort(public))
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
