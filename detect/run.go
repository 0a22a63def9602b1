package detect

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"peerlink/nat"
	"peerlink/stun"
)

// allocSockets is how many fresh sockets measure port allocation: three deltas, enough
// to tell a steady step from chance.
const allocSockets = 4

// ServerResult is what one observer said during a detection.
type ServerResult struct {
	Addr netip.AddrPort `json:"addr"`
	// RTT of the first answered Binding request; zero when the server never answered.
	RTT    time.Duration  `json:"rtt_ns"`
	Mapped netip.AddrPort `json:"mapped,omitzero"`
	// RFC5780 is true when the server reported an alternate address (OTHER-ADDRESS).
	RFC5780 bool   `json:"rfc5780"`
	Err     string `json:"error,omitempty"`
}

// Report explains a fresh detection: the profile, each observer's answer, and how long
// it took.
type Report struct {
	Profile  nat.Profile    `json:"profile"`
	Servers  []ServerResult `json:"servers"`
	Duration time.Duration  `json:"duration_ns"`
	// Notes says why a policy is unknown or confidence is reduced.
	Notes []string `json:"notes,omitempty"`
}

// run is one detection: every test in parallel, each on the socket the RFC asks for.
type run struct {
	d         *Detector
	observers []netip.AddrPort
	localIPs  []netip.Addr

	mu     sync.Mutex
	report Report
}

func (r *run) note(format string, args ...any) {
	r.mu.Lock()
	r.report.Notes = append(r.report.Notes, fmt.Sprintf(format, args...))
	r.mu.Unlock()
}

// detect measures the NAT. The budget bounds the whole run; tests whose verdict is "no
// answer" (filtering, hairpinning) wait only a few round trips, so a typical run costs
// about three round trips to the primary observer.
func (r *run) detect(ctx context.Context, budget time.Duration) (Report, error) {
	c := r.d.clock
	start := c.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopBudget := c.AfterFunc(budget, cancel)
	defer stopBudget.Stop()

	open := func() (*prober, error) {
		conn, err := r.d.net.ListenPacket(ctx, r.d.network, r.d.bind)
		if err != nil {
			return nil, fmt.Errorf("detect: open probe socket: %w", err)
		}
		return newProber(c, conn), nil
	}
	var probers []*prober
	defer func() {
		for _, p := range probers {
			p.close()
		}
	}()
	newSock := func() (*prober, error) {
		p, err := open()
		if err == nil {
			probers = append(probers, p)
		}
		return p, err
	}

	primary := r.observers[0]
	rto := r.d.rto
	var wg sync.WaitGroup
	defer wg.Wait()

	// Allocation first and one at a time: a contiguous NAT numbers new mappings in the
	// order it sees them, so nothing else may open a mapping in between.
	allocPorts := make([]struct{ local, mapped uint16 }, allocSockets)
	allocOK := make([]bool, allocSockets)
	for i := range allocSockets {
		p, err := newSock()
		if err != nil {
			return Report{}, err
		}
		sent := make(chan struct{})
		wg.Go(func() {
			a, err := p.roundTripNotify(ctx, primary, 0, rto, sent)
			if err == nil && a.code == 0 {
				allocPorts[i].local, allocPorts[i].mapped = p.local.Port(), a.mapped.Port()
				allocOK[i] = true
			}
		})
		select {
		case <-sent:
		case <-ctx.Done():
		}
	}

	// Filtering: fresh sockets, because any earlier packet to the server would already
	// have opened the filter. Sent now, judged once the round trip is known.
	type filterResult struct {
		answered bool
		valid    bool // the answer came from where the change asked for
		err      error
	}
	filterIPPort, filterPort := make(chan filterResult, 1), make(chan filterResult, 1)
	for _, f := range []struct {
		change stun.ChangeRequest
		out    chan filterResult
	}{{stun.ChangeIP | stun.ChangePort, filterIPPort}, {stun.ChangePort, filterPort}} {
		p, err := newSock()
		if err != nil {
			return Report{}, err
		}
		wg.Go(func() {
			a, err := p.roundTrip(ctx, primary, f.change, rto)
			switch {
			case err != nil:
				f.out <- filterResult{err: err}
			case a.code != 0:
				f.out <- filterResult{answered: true, err: fmt.Errorf("server answered CHANGE-REQUEST with error %d", a.code)}
			default:
				valid := a.origin.Port() != primary.Port() && (f.change&stun.ChangeIP == 0 || a.origin.Addr() != primary.Addr())
				f.out <- filterResult{answered: true, valid: valid}
			}
		})
	}

	// Test I from the main socket to every observer at once.
	main, err := newSock()
	if err != nil {
		return Report{}, err
	}
	results := make([]ServerResult, len(r.observers))
	firstAnswer := make(chan struct{})
	var firstOnce sync.Once
	var obsWG sync.WaitGroup
	// Other observers are bounded by the verdict window below; the primary's Tests I to
	// III by the budget only: they wait for answers that will come, and cutting them
	// short on a lossy link would leave the mapping unknown.
	obsCtx, obsCancel := context.WithCancel(ctx)
	defer obsCancel()
	for i, o := range r.observers {
		results[i].Addr = o
		octx := obsCtx
		if i == 0 {
			octx = ctx
		}
		obsWG.Go(func() {
			a, err := main.roundTrip(octx, o, 0, rto)
			if err == nil && a.code != 0 {
				err = fmt.Errorf("error response %d", a.code)
			}
			if err != nil {
				results[i].Err = err.Error()
				return
			}
			results[i].RTT, results[i].Mapped, results[i].RFC5780 = a.rtt, a.mapped, a.other.IsValid()
			if i == 0 {
				firstOnce.Do(func() { close(firstAnswer) })
			}
			if i == 0 && a.other.IsValid() {
				r.mappingTests(ctx, main, a, &results[i])
			}
		})
	}

	// Wait for the primary's Test I; without it nothing below can be judged.
	select {
	case <-firstAnswer:
	case <-ctx.Done():
		cancel()
		obsWG.Wait()
		r.report.Servers = results
		r.report.Duration = c.Now().Sub(start)
		if slices.ContainsFunc(results, func(s ServerResult) bool { return s.Mapped.IsValid() }) {
			return r.report, fmt.Errorf("%w: primary observer %v did not answer within %v", ErrDetectionTimeout, primary, budget)
		}
		r.report.Profile = nat.Profile{UDPBlocked: true, DetectedAt: c.Now(), Confidence: nat.ConfidenceLow}
		return r.report, fmt.Errorf("%w: no observer answered within %v (UDP blocked?)", ErrDetectionTimeout, budget)
	}
	rtt := results[0].RTT
	// "No answer" verdicts: long enough for a retransmission to have come back.
	negWait := max(3*rtt, rtt+100*time.Millisecond)
	verdictCtx, verdictCancel := context.WithCancel(ctx)
	defer verdictCancel()
	stopVerdict := c.AfterFunc(negWait-rtt, verdictCancel)
	defer stopVerdict.Stop()

	public := results[0].Mapped
	if err := main.sendHairpin(public); err != nil {
		r.note("hairpin probe: %v", err)
	}

	// Other observers: wait for them within the verdict window only; a slow observer
	// should not hold up the profile.
	obsDone := make(chan struct{})
	go func() { obsWG.Wait(); close(obsDone) }()
	select {
	case <-obsDone:
	case <-verdictCtx.Done():
		obsCancel() // stop the stragglers; their error is recorded
		<-obsDone
	}

	// Wait until every verdict is in or the window closes, then read what arrived: a
	// result that is ready always wins over the deadline.
	var fIPPort, fPort filterResult
	gotIPPort, gotPort := false, false
	hairpin := false
wait:
	for !(gotIPPort && gotPort && hairpin) {
		select {
		case fIPPort = <-filterIPPort:
			gotIPPort = true
		case fPort = <-filterPort:
			gotPort = true
		case <-hairpinned(main, hairpin):
			hairpin = true
		case <-verdictCtx.Done():
			break wait
		}
	}
	cancel()
	wg.Wait()
	if !gotIPPort {
		fIPPort = <-filterIPPort
	}
	if !gotPort {
		fPort = <-filterPort
	}
	select {
	case <-main.hairpinned:
		hairpin = true
	default:
	}

	p := nat.Profile{PublicIP: public.Addr(), PublicPort: public.Port(), Hairpinning: hairpin, DetectedAt: c.Now()}
	conf := nat.ConfidenceHigh
	lower := func(to nat.Confidence, why string, args ...any) {
		conf = min(conf, to)
		r.note(why, args...)
	}

	p.Open = slices.Contains(r.localIPs, public.Addr())

	// Mapping: RFC 5780 tests II and III when the primary supports them, cross-checked
	// with what independent observers saw.
	mapping := r.report.Profile.Mapping // set by mappingTests
	obsMapping, obsExact, obsN := mappingFromObservers(results)
	switch {
	case mapping != nat.MappingUnknown && obsMapping != nat.MappingUnknown && obsMapping > mapping:
		// The observers prove at least obsMapping: the RFC 5780 verdict is too lenient.
		lower(nat.ConfidenceLow, "observers contradict the RFC 5780 tests (at least %s, not %s): keeping the stricter", obsMapping, mapping)
		mapping = obsMapping
	case mapping == nat.MappingUnknown && obsMapping != nat.MappingUnknown:
		mapping = obsMapping
		if !obsExact {
			// Host- and port-dependent look alike without two ports on one IP.
			mapping = nat.MappingPD
		}
		lower(nat.ConfidenceMedium, "mapping from %d independent observers only (no RFC 5780 server)", obsN)
	case mapping == nat.MappingUnknown:
		lower(nat.ConfidenceLow, "mapping unknown: needs an RFC 5780 server or two observers")
	case obsN < 2:
		lower(nat.ConfidenceMedium, "mapping from one RFC 5780 server, not confirmed by an independent observer")
	}
	if p.Open {
		mapping = nat.MappingEI
	}
	p.Mapping = mapping

	// Filtering: RFC 5780 test II (change IP and port) then test III (change port).
	switch {
	case fIPPort.err != nil && fIPPort.answered || fPort.err != nil && fPort.answered:
		lower(nat.ConfidenceLow, "filtering unknown: primary observer refused CHANGE-REQUEST")
	case !results[0].RFC5780:
		lower(nat.ConfidenceLow, "filtering unknown: primary observer %v is not an RFC 5780 server", primary)
	case fIPPort.answered && fIPPort.valid:
		p.Filtering = nat.FilteringEI
	case fIPPort.answered || fPort.answered && !fPort.valid:
		lower(nat.ConfidenceLow, "filtering unknown: server ignored CHANGE-REQUEST")
	case fPort.answered:
		p.Filtering = nat.FilteringHD
	default:
		p.Filtering = nat.FilteringPD
	}

	// Allocation.
	var ports [][2]uint16
	for i, ok := range allocOK {
		if ok {
			ports = append(ports, [2]uint16{allocPorts[i].local, allocPorts[i].mapped})
		}
	}
	alloc, delta, sure := allocationOf(ports)
	if p.Open {
		alloc, delta, sure = nat.AllocationPP, 0, true
	}
	if !sure {
		lower(nat.ConfidenceMedium, "allocation from %d of %d sockets", len(ports), allocSockets)
	}
	p.Allocation, p.PortDelta = alloc, delta
	p.Confidence = conf

	r.report.Profile = p
	r.report.Servers = results
	r.report.Duration = c.Now().Sub(start)
	if errors.Is(ctx.Err(), context.Canceled) && p.Mapping == nat.MappingUnknown && p.Filtering == nat.FilteringUnknown {
		return r.report, fmt.Errorf("%w: only the reflexive address was learned", ErrDetectionTimeout)
	}
	return r.report, nil
}

// mappingTests runs RFC 5780 tests II and III in parallel on the main socket.
func (r *run) mappingTests(ctx context.Context, main *prober, test1 answer, res *ServerResult) {
	alt := test1.other
	primaryPort := r.observers[0].Port()
	var a2, a3 answer
	var e2, e3 error
	var wg sync.WaitGroup
	wg.Go(func() {
		a2, e2 = main.roundTrip(ctx, netip.AddrPortFrom(alt.Addr(), primaryPort), 0, r.d.rto)
	})
	wg.Go(func() { a3, e3 = main.roundTrip(ctx, alt, 0, r.d.rto) })
	wg.Wait()
	var m nat.Mapping
	switch {
	case e2 != nil || a2.code != 0:
		r.note("RFC 5780 test II to %v: no usable answer", alt.Addr())
		return
	case a2.mapped == test1.mapped:
		m = nat.MappingEI
	case e3 != nil || a3.code != 0:
		r.note("RFC 5780 test III to %v: no usable answer", alt)
		return
	case a3.mapped == a2.mapped:
		m = nat.MappingHD
	default:
		m = nat.MappingPD
	}
	r.mu.Lock()
	r.report.Profile.Mapping = m
	r.mu.Unlock()
}

// mappingFromObservers compares the reflexive addresses that observers at different
// addresses saw for one socket. It returns the mapping the evidence proves at least,
// whether it is exact (HD is only a lower bound unless two ports of one IP agreed), and
// how many observers answered.
func mappingFromObservers(results []ServerResult) (m nat.Mapping, exact bool, n int) {
	var seen []ServerResult
	for _, s := range results {
		if s.Mapped.IsValid() {
			seen = append(seen, s)
		}
	}
	if len(seen) < 2 {
		return nat.MappingUnknown, false, len(seen)
	}
	diffIP, sameIPPairs, sameIPEqual := false, 0, 0
	allSame := true
	for i := range seen {
		if seen[i].Mapped != seen[0].Mapped {
			allSame = false
		}
		for j := i + 1; j < len(seen); j++ {
			if seen[i].Addr.Addr() != seen[j].Addr.Addr() {
				diffIP = true
				continue
			}
			sameIPPairs++
			if seen[i].Mapped == seen[j].Mapped {
				sameIPEqual++
			}
		}
	}
	switch {
	case allSame && diffIP:
		return nat.MappingEI, true, len(seen)
	case allSame:
		// One destination IP only: a host-dependent NAT would look the same.
		return nat.MappingUnknown, false, len(seen)
	case sameIPEqual < sameIPPairs:
		return nat.MappingPD, true, len(seen)
	default:
		return nat.MappingHD, sameIPPairs > 0, len(seen)
	}
}

// allocationOf classifies port allocation from (local, mapped) port pairs of fresh
// sockets, in the order their mappings were made. sure is false when the evidence is
// thin (fewer than three sockets, or one delta out of line).
func allocationOf(ports [][2]uint16) (nat.Allocation, int, bool) {
	if len(ports) < 2 {
		return nat.AllocationUnknown, 0, false
	}
	preserved := 0
	for _, p := range ports {
		if p[0] == p[1] {
			preserved++
		}
	}
	if preserved == len(ports) {
		return nat.AllocationPP, 0, len(ports) >= 3
	}
	counts := map[int]int{}
	for i := 1; i < len(ports); i++ {
		d := int(ports[i][1]) - int(ports[i-1][1])
		counts[d]++
	}
	best, bestN := 0, 0
	for d, n := range counts {
		if n > bestN || n == bestN && abs(d) < abs(best) {
			best, bestN = d, n
		}
	}
	deltas := len(ports) - 1
	switch {
	case best != 0 && abs(best) <= 64 && bestN == deltas:
		return nat.AllocationPC, best, deltas >= 2
	case best != 0 && abs(best) <= 64 && bestN >= 2 && bestN == deltas-1:
		return nat.AllocationPC, best, false
	case preserved > len(ports)/2:
		// Most ports kept: preservation with the odd collision.
		return nat.AllocationPP, 0, false
	}
	return nat.AllocationRD, 0, len(ports) >= 3
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

// hairpinned returns the channel that closes when the hairpin probe comes back, or nil
// (never ready) once that has been seen.
func hairpinned(p *prober, seen bool) <-chan struct{} {
	if seen {
		return nil
	}
	return p.hairpinned
}
