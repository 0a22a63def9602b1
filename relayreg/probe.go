package relayreg

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"peerlink/nettype"
	"peerlink/stun"
)

// STUNProber measures a udp endpoint with a STUN Binding request (RFC 8489) — every
// peerlink relay and TURN server answers one — and a tcp or tls endpoint by the time a
// TCP handshake takes.
type STUNProber struct {
	// Listener opens the probe socket; nil means the host's network.
	Listener nettype.PacketListener
	// Timeout bounds a probe that has no deadline in its context; zero means 1 s.
	Timeout time.Duration
	// Retransmit is the gap between Binding requests; zero means 250 ms.
	Retransmit time.Duration
}

// Probe measures e's round trip.
func (p STUNProber) Probe(ctx context.Context, e Endpoint) (time.Duration, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cmp.Or(p.Timeout, time.Second))
		defer cancel()
	}
	if e.Transport != UDP {
		var d net.Dialer
		start := time.Now()
		c, err := d.DialContext(ctx, "tcp", e.Addr)
		if err != nil {
			return 0, err
		}
		rtt := time.Since(start)
		c.Close()
		return rtt, nil
	}
	raddr, err := net.DefaultResolver.LookupNetIP(ctx, "ip", hostOf(e.Addr))
	if err != nil || len(raddr) == 0 {
		return 0, fmt.Errorf("relayreg: resolve %s: %v", e.Addr, err)
	}
	ua, err := net.ResolveUDPAddr("udp", net.JoinHostPort(raddr[0].Unmap().String(), portOf(e.Addr)))
	if err != nil {
		return 0, err
	}
	pc, err := nettype.Or(p.Listener).ListenPacket(ctx, "udp", ":0")
	if err != nil {
		return 0, err
	}
	defer pc.Close()
	stop := context.AfterFunc(ctx, func() { pc.SetReadDeadline(time.Now()) })
	defer stop()

	id := stun.NewTransactionID()
	req := stun.AppendBindingRequest(nil, id, stun.RequestOptions{})
	gap := cmp.Or(p.Retransmit, 250*time.Millisecond)
	buf := make([]byte, 1500)
	for {
		sent := time.Now()
		if _, err := pc.WriteTo(req, ua); err != nil {
			return 0, err
		}
		pc.SetReadDeadline(sent.Add(gap))
		for {
			n, _, err := pc.ReadFrom(buf)
			if err == nil {
				if answers(buf[:n], id) {
					// Measured from the latest transmission: an answer to an earlier
					// one makes the figure smaller by up to one gap, which on a lossy
					// path is still the better estimate of the next round trip.
					return time.Since(sent), nil
				}
				continue
			}
			if ctx.Err() != nil {
				return 0, fmt.Errorf("relayreg: no STUN answer from %s: %w", e.Addr, ctx.Err())
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				break // retransmit
			}
			return 0, err
		}
	}
}

// answers reports whether b is a Binding success or error response to transaction id:
// either proves the endpoint is alive.
func answers(b []byte, id stun.TransactionID) bool {
	r, err := stun.ParseBindingResponse(b)
	var re *stun.ResponseError
	return r.TransactionID == id && (err == nil || errors.As(err, &re))
}

func hostOf(addr string) string {
	h, _, _ := net.SplitHostPort(addr)
	return h
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
