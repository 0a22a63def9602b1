package probe

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"peerlink/nat"
	"peerlink/nettype"
)

// Errors returned by the client.
var (
	// ErrNoAnswer means a request got no answer after every attempt.
	ErrNoAnswer = errors.New("probe: no answer")
	// ErrWrongOrigin means an answer came from another address than the one asked for:
	// the server is misconfigured, so no filtering conclusion can be drawn.
	ErrWrongOrigin = errors.New("probe: answer from unexpected address")
)

// Client measures the NAT between its sockets and a probe Server.
//
// The zero value is not usable: Server must be set. Other zero fields have defaults.
type Client struct {
	// Listener opens the probing sockets; nil means the host's network.
	Listener nettype.PacketListener
	// Server is where the probe server listens.
	Server Endpoints
	// LocalIP is the address sockets bind to. It is also how "no NAT" is recognised (the
	// observed address equals the bound one), so leave it zero only when that does not
	// matter: a zero LocalIP binds the unspecified address and never reports Open.
	LocalIP netip.Addr
	// Timeout is how long one attempt waits for an answer; zero means 300ms.
	Timeout time.Duration
	// Attempts is how many times a request is sent before giving up; zero means 3.
	// A lost packet looks like stricter filtering, so lossy paths need more.
	Attempts int
	// Sockets is how many fresh sockets the allocation test uses; values below 3 mean 5.
	Sockets int
}

func (c *Client) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return 300 * time.Millisecond
}

func (c *Client) attempts() int {
	if c.Attempts > 0 {
		return c.Attempts
	}
	return 3
}

func (c *Client) sockets() int {
	if c.Sockets >= 3 {
		return c.Sockets
	}
	return 5
}

// Listen opens a fresh probing socket bound to LocalIP and an ephemeral port.
func (c *Client) Listen(ctx context.Context) (net.PacketConn, error) {
	return c.ListenPort(ctx, 0)
}

// ListenPort opens a probing socket bound to LocalIP and port.
func (c *Client) ListenPort(ctx context.Context, port uint16) (net.PacketConn, error) {
	network, addr := "udp4", "0.0.0.0"
	if c.LocalIP.IsValid() {
		addr = c.LocalIP.String()
		if c.LocalIP.Is6() {
			network = "udp6"
		}
	} else if c.Server.Primary.Is6() {
		network, addr = "udp6", "::"
	}
	return nettype.Or(c.Listener).ListenPacket(ctx, network, net.JoinHostPort(addr, fmt.Sprint(port)))
}

// Answer is the outcome of one request.
type Answer struct {
	// Mapped is the source address the server observed: the NAT's mapping.
	Mapped netip.AddrPort
	// From is where the answer came from, as the socket saw it.
	From netip.AddrPort
	// RTT is measured from the last send.
	RTT time.Duration
}

// Transact sends a request to dst on conn, asking for the answer to come from the other
// IP and/or port, and waits for it, resending up to Attempts times. It returns an error
// wrapping ErrNoAnswer when nothing came back, and ErrWrongOrigin when the answer came
// from another address than the one the change flags ask for.
func (c *Client) Transact(ctx context.Context, conn net.PacketConn, dst netip.AddrPort, changeIP, changePort bool) (Answer, error) {
	req := Message{ChangeIP: changeIP, ChangePort: changePort}
	if _, err := rand.Read(req.TxID[:]); err != nil {
		return Answer{}, err
	}
	want := c.Server.other(dst, changeIP, changePort)
	wire := req.Append(nil)
	buf := make([]byte, 2048)
	to := net.UDPAddrFromAddrPort(dst)
	// Cancelling ctx wakes a pending read.
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()
	ctxDeadline, hasDeadline := ctx.Deadline()
	for range c.attempts() {
		if err := ctx.Err(); err != nil {
			return Answer{}, err
		}
		if hasDeadline && !time.Now().Before(ctxDeadline) {
			return Answer{}, context.DeadlineExceeded
		}
		sent := time.Now()
		if _, err := conn.WriteTo(wire, to); err != nil {
			return Answer{}, fmt.Errorf("probe: send to %s: %w", dst, err)
		}
		deadline := sent.Add(c.timeout())
		if hasDeadline && ctxDeadline.Before(deadline) {
			deadline = ctxDeadline
		}
		if err := conn.SetReadDeadline(deadline); err != nil {
			return Answer{}, err
		}
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break // resend
				}
				return Answer{}, fmt.Errorf("probe: read: %w", err)
			}
			m, err := Parse(buf[:n])
			if err != nil || !m.Response || m.TxID != req.TxID {
				continue // stray or stale datagram
			}
			src, _ := addrPortOf(from)
			a := Answer{Mapped: m.Observed, From: src, RTT: time.Since(sent)}
			if src != want {
				return a, fmt.Errorf("%w: asked %s for an answer from %s, got one from %s", ErrWrongOrigin, dst, want, src)
			}
			return a, nil
		}
	}
	if err := ctx.Err(); err != nil {
		return Answer{}, err
	}
	if hasDeadline && !time.Now().Before(ctxDeadline) {
		return Answer{}, context.DeadlineExceeded
	}
	return Answer{}, fmt.Errorf("%w from %s (change ip %v, change port %v) to %s after %d tries of %v",
		ErrNoAnswer, want, changeIP, changePort, dst, c.attempts(), c.timeout())
}

// MappingResult is the outcome of the RFC 5780 style mapping tests.
type MappingResult struct {
	Mapping nat.Mapping
	// Open is true when the observed address equals the socket's own: there is no NAT.
	Open bool
	// Local is the probing socket's address.
	Local netip.AddrPort
	// Mapped holds what the server saw for requests to primary IP and port, alternate IP
	// and primary port, and alternate IP and port.
	Mapped [3]netip.AddrPort
}

func (r MappingResult) String() string {
	return fmt.Sprintf("mapping %s: local %s seen as %s (ip1:p1) %s (ip2:p1) %s (ip2:p2)", r.Mapping, r.Local, r.Mapped[0], r.Mapped[1], r.Mapped[2])
}

// Mapping runs the mapping tests on one fresh socket. When even the first request gets
// no answer the error wraps ErrNoAnswer.
func (c *Client) Mapping(ctx context.Context) (MappingResult, error) {
	conn, err := c.Listen(ctx)
	if err != nil {
		return MappingResult{}, err
	}
	defer conn.Close()
	var r MappingResult
	r.Local, _ = addrPortOf(conn.LocalAddr())
	dsts := [3]netip.AddrPort{c.Server.Addr(false, false), c.Server.Addr(true, false), c.Server.Addr(true, true)}
	for i, dst := range dsts {
		a, err := c.Transact(ctx, conn, dst, false, false)
		if err != nil {
			return r, fmt.Errorf("mapping test %d: %w", i+1, err)
		}
		r.Mapped[i] = a.Mapped
	}
	r.Open = c.LocalIP.IsValid() && r.Mapped[0] == r.Local
	switch {
	case r.Mapped[1] == r.Mapped[0]:
		r.Mapping = nat.MappingEI
	case r.Mapped[2] == r.Mapped[1]:
		r.Mapping = nat.MappingHD
	default:
		r.Mapping = nat.MappingPD
	}
	return r, nil
}

// FilteringResult is the outcome of the filtering tests.
type FilteringResult struct {
	Filtering nat.Filtering
	// ChangeBoth and ChangePort say whether an answer from the other IP and port, and
	// from the same IP but other port, got through.
	ChangeBoth, ChangePort bool
}

func (r FilteringResult) String() string {
	word := map[bool]string{true: "answered", false: "filtered"}
	return fmt.Sprintf("filtering %s: from ip2:p2 %s, from ip1:p2 %s", r.Filtering, word[r.ChangeBoth], word[r.ChangePort])
}

// Filtering runs the filtering tests, each on a fresh socket because filtering depends
// on what the socket has sent before. Each test first checks that plain requests get
// through, so a filtered answer is not confused with a dead path.
func (c *Client) Filtering(ctx context.Context) (FilteringResult, error) {
	var r FilteringResult
	var err error
	if r.ChangeBoth, err = c.filterTest(ctx, true); err != nil {
		return r, err
	}
	if r.ChangePort, err = c.filterTest(ctx, false); err != nil {
		return r, err
	}
	switch {
	case r.ChangeBoth && r.ChangePort:
		r.Filtering = nat.FilteringEI
	case r.ChangeBoth:
		// An answer from a never-contacted IP passed but one from a contacted IP did not:
		// no consistent policy.
		return r, fmt.Errorf("probe: inconsistent filtering: answer from other ip and port passed, from other port only did not")
	case r.ChangePort:
		r.Filtering = nat.FilteringHD
	default:
		r.Filtering = nat.FilteringPD
	}
	return r, nil
}

func (c *Client) filterTest(ctx context.Context, changeIP bool) (bool, error) {
	conn, err := c.Listen(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	dst := c.Server.Addr(false, false)
	if _, err := c.Transact(ctx, conn, dst, false, false); err != nil {
		return false, fmt.Errorf("filtering test control request: %w", err)
	}
	_, err = c.Transact(ctx, conn, dst, changeIP, true)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ErrNoAnswer):
		return false, nil
	default:
		return false, err
	}
}

// PortPair is one allocation sample: a socket's local port and its mapped port.
type PortPair struct {
	Local, Mapped uint16
}

// AllocationResult is the outcome of the allocation test.
type AllocationResult struct {
	Allocation nat.Allocation
	// Delta is the step between consecutive mapped ports when Allocation is PC.
	Delta   int
	Samples []PortPair
}

func (r AllocationResult) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "allocation %s", r.Allocation)
	if r.Allocation == nat.AllocationPC {
		fmt.Fprintf(&b, " delta %+d", r.Delta)
	}
	b.WriteString(":")
	for _, s := range r.Samples {
		fmt.Fprintf(&b, " %d->%d", s.Local, s.Mapped)
	}
	return b.String()
}

// Allocation opens Sockets fresh sockets one after the other, each sending one request
// to the primary endpoint, and classifies the mapped ports: all equal to the local ports
// is preservation, a constant step is contiguity, anything else random. The sockets stay
// open until the end so the operating system cannot hand out the same port twice.
func (c *Client) Allocation(ctx context.Context) (AllocationResult, error) {
	var r AllocationResult
	n := c.sockets()
	conns := make([]net.PacketConn, 0, n)
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	for i := range n {
		conn, err := c.Listen(ctx)
		if err != nil {
			return r, err
		}
		conns = append(conns, conn)
		local, _ := addrPortOf(conn.LocalAddr())
		a, err := c.Transact(ctx, conn, c.Server.Addr(false, false), false, false)
		if err != nil {
			return r, fmt.Errorf("allocation sample %d: %w", i+1, err)
		}
		r.Samples = append(r.Samples, PortPair{Local: local.Port(), Mapped: a.Mapped.Port()})
	}
	r.Allocation, r.Delta = classifyAllocation(r.Samples)
	return r, nil
}

// classifyAllocation calls a constant step contiguity only when it saw at least two
// steps: any two ports differ by a constant.
func classifyAllocation(s []PortPair) (nat.Allocation, int) {
	preserved := true
	for _, p := range s {
		if p.Local != p.Mapped {
			preserved = false
		}
	}
	if preserved {
		return nat.AllocationPP, 0
	}
	if len(s) < 3 {
		return nat.AllocationRD, 0
	}
	delta := 0
	for i := 1; i < len(s); i++ {
		d := int(int16(s[i].Mapped - s[i-1].Mapped)) // wraps around 65535 -> 0
		if d == 0 || (i > 1 && d != delta) {
			return nat.AllocationRD, 0
		}
		delta = d
	}
	return nat.AllocationPC, delta
}

// Result is a full measurement.
type Result struct {
	// UDPBlocked is true when not even the first request was answered.
	UDPBlocked bool
	Mapping    MappingResult
	Filtering  FilteringResult
	Allocation AllocationResult
}

// Measure runs the mapping, filtering and allocation tests. A path on which no request is
// answered at all is reported as UDPBlocked, not as an error.
func (c *Client) Measure(ctx context.Context) (Result, error) {
	var r Result
	var err error
	r.Mapping, err = c.Mapping(ctx)
	if err != nil {
		if errors.Is(err, ErrNoAnswer) && !r.Mapping.Mapped[0].IsValid() {
			r.UDPBlocked = true
			return r, nil
		}
		return r, err
	}
	if r.Filtering, err = c.Filtering(ctx); err != nil {
		return r, err
	}
	if r.Allocation, err = c.Allocation(ctx); err != nil {
		return r, err
	}
	return r, nil
}

// Profile returns the measurement as a nat.Profile.
func (r Result) Profile() nat.Profile {
	if r.UDPBlocked {
		return nat.Profile{UDPBlocked: true}
	}
	p := nat.Profile{
		Mapping:    r.Mapping.Mapping,
		Filtering:  r.Filtering.Filtering,
		Allocation: r.Allocation.Allocation,
		PortDelta:  r.Allocation.Delta,
		Open:       r.Mapping.Open,
		PublicIP:   r.Mapping.Mapped[0].Addr(),
		PublicPort: r.Mapping.Mapped[0].Port(),
	}
	return p
}

// String gives the evidence behind the result on one line.
func (r Result) String() string {
	if r.UDPBlocked {
		return "udp blocked: no answer to any request"
	}
	return r.Mapping.String() + "; " + r.Filtering.String() + "; " + r.Allocation.String()
}
