package punch_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	pion "github.com/pion/stun/v3"

	"peerlink/clock"
	"peerlink/detect"
	"peerlink/mux"
	"peerlink/nat"
	"peerlink/natlab"
	"peerlink/punch"
)

func mustType(t testing.TB, s string) nat.Type {
	t.Helper()
	ty, err := nat.ParseType(s)
	if err != nil {
		t.Fatal(err)
	}
	return ty
}

// pairWorld builds a world with peers a and b behind NATs of the given types.
func pairWorld(t *testing.T, seed uint64, ta, tb string, oa, ob peerOpts) (*world, *peer, *peer) {
	t.Helper()
	w, err := newWorld(seed)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.close)
	oa.typ, oa.natIP, oa.hostIP = mustType(t, ta), natIPA, hostIPA
	ob.typ, ob.natIP, ob.hostIP = mustType(t, tb), natIPB, hostIPB
	ctx := context.Background()
	a, err := w.addPeer(ctx, "a", oa)
	if err != nil {
		t.Fatal(err)
	}
	b, err := w.addPeer(ctx, "b", ob)
	if err != nil {
		t.Fatal(err)
	}
	return w, a, b
}

// representatives is one ordered pair of types per technique, each among the hardest
// for its technique: destination-dependent mappings wherever the technique allows them.
func representatives(t *testing.T) map[nat.Technique][2]nat.Type {
	out := map[nat.Technique][2]nat.Type{}
	for tech, pair := range map[nat.Technique][2]string{
		nat.Direct:                  {"pd-pd-rd", "ei-ei-rd"},
		nat.Reversal:                {"ei-ei-pc", "pd-pd-rd"},
		nat.SimplePunch:             {"pd-ei-rd", "pd-hd-rd"},
		nat.PredictPreservation:     {"hd-hd-pp", "pd-pd-rd"},
		nat.PredictContiguity:       {"pd-hd-pc", "hd-hd-rd"},
		nat.PredictPreservationBoth: {"pd-pd-pp", "pd-pd-pp"},
		nat.PredictContiguityBoth:   {"pd-pd-pc", "pd-pd-pc"},
		nat.PredictMixed:            {"pd-pd-pp", "pd-pd-pc"},
		nat.Birthday:                {"pd-pd-rd", "ei-pd-pp"},
	} {
		a, b := mustType(t, pair[0]), mustType(t, pair[1])
		p := func(ty nat.Type) nat.Profile {
			return nat.Profile{Mapping: ty.Mapping, Filtering: ty.Filtering, Allocation: ty.Allocation, PortDelta: 1}
		}
		if got := nat.Strategy(p(a), p(b)).Primary().Technique; got != tech {
			t.Fatalf("%s→%s: strategy picks %v, want %v", a, b, got, tech)
		}
		out[tech] = [2]nat.Type{a, b}
	}
	return out
}

// TestLoss: with 5% loss on both NATs' uplinks, every technique still finds its path.
func TestLoss(t *testing.T) {
	reps := representatives(t)
	var mu sync.Mutex
	var lost uint64
	t.Run("group", func(t *testing.T) {
		for _, tech := range sortedTechniques(reps) {
			pair := reps[tech]
			for seed := uint64(1); seed <= 4; seed++ {
				t.Run(fmt.Sprintf("%s/%s-%s/seed%d", tech, pair[0], pair[1], seed), func(t *testing.T) {
					t.Parallel()
					lossy := peerOpts{cfg: fast, delta: 2, uplink: natlab.Link{Loss: 0.05}}
					_, a, b := pairWorld(t, seed, pair[0].String(), pair[1].String(), lossy, lossy)
					step := nat.Strategy(a.profile, b.profile).Primary()
					out, err := runPair(context.Background(), a, b, step, runOpts{copies: 5})
					if err != nil {
						t.Fatal(err)
					}
					if !out.ok() {
						t.Fatalf("%v: no path: %v", step, out.err())
					}
					mu.Lock()
					lost += a.nat.Stats().Lost + b.nat.Stats().Lost
					mu.Unlock()
				})
			}
		}
	})
	if lost < 20 {
		t.Errorf("only %d packets lost in all runs: the test did not test loss", lost)
	}
	t.Logf("%d packets lost", lost)
}

// TestResultsAgree: both sides end on the same path, each knows its reflexive address as
// the other saw it, and the sockets the attempt opened and did not hand over are closed.
func TestResultsAgree(t *testing.T) {
	for _, tt := range []struct{ a, b string }{
		{"pd-pd-rd", "ei-pd-pp"}, // birthday, hard initiator
		{"ei-pd-pp", "pd-pd-rd"}, // birthday, hard responder
		{"pd-pd-pc", "pd-pd-pc"}, // interleaved contiguity
		{"hd-hd-pp", "pd-pd-rd"}, // prediction of the initiator
	} {
		t.Run(tt.a+"/"+tt.b, func(t *testing.T) {
			w, a, b := pairWorld(t, 7, tt.a, tt.b, peerOpts{cfg: fast, delta: 1}, peerOpts{cfg: fast, delta: 1})
			step := nat.Strategy(a.profile, b.profile).Primary()
			out, err := runPair(context.Background(), a, b, step, runOpts{})
			if err != nil || !out.ok() {
				t.Fatalf("%v: %v %v", step, err, out.err())
			}
			ra, rb := out.resA, out.resB
			// Each side's reflexive address is where the other's packets come from,
			// on the other's NAT.
			if ra.Reflexive.Addr() != natIPA || rb.Reflexive.Addr() != natIPB {
				t.Errorf("reflexive addresses %v, %v; want on %v and %v", ra.Reflexive, rb.Reflexive, natIPA, natIPB)
			}
			if rb.Remote != ra.Reflexive {
				t.Errorf("responder sends to %v, initiator was seen at %v", rb.Remote, ra.Reflexive)
			}
			if ra.Technique != step.Technique || rb.Technique != step.Technique || ra.Attempts < 1 || rb.Attempts < 1 {
				t.Errorf("results %+v, %+v", ra, rb)
			}
			if ra.RTT <= 0 {
				t.Errorf("initiator RTT %v", ra.RTT)
			}
			// After the attempts are closed (and the handed-over sockets, by
			// runPair), only the main sockets remain, and they still work.
			for _, p := range []*peer{a, b} {
				if n := boundPorts(p.host); n != 1 {
					t.Errorf("%s: %d sockets open, want only the main one", p.name, n)
				}
				if _, err := p.main.Binding(context.Background(), w.stun, 20*time.Millisecond); err != nil {
					t.Errorf("%s: main socket unusable after the attempt: %v", p.name, err)
				}
			}
		})
	}
}

// boundPorts counts the host's sockets by trying to bind every ephemeral port.
func boundPorts(h *natlab.Host) int {
	n := 0
	for port := 32768; port <= 60999; port++ {
		c, err := h.ListenPacket(context.Background(), "udp4", fmt.Sprintf(":%d", port))
		if err != nil {
			n++
			continue
		}
		c.Close()
	}
	return n
}

// TestWrongKey: a peer with another key is never heard and never validates.
func TestWrongKey(t *testing.T) {
	_, a, b := pairWorld(t, 1, "ei-pd-pp", "ei-hd-pp", peerOpts{cfg: fast}, peerOpts{cfg: fast})
	step := nat.Strategy(a.profile, b.profile).Primary()
	out, err := runPair(context.Background(), a, b, step, runOpts{keyB: []byte("another key, 16+ bytes"), timeout: 200 * time.Millisecond, tries: 1})
	if err != nil {
		t.Fatal(err)
	}
	for side, err := range map[string]error{"a": out.errA, "b": out.errB} {
		var fe *punch.FailError
		if !errors.As(err, &fe) || !errors.Is(err, punch.ErrPunchFailed) || !errors.Is(err, punch.ErrTimeout) {
			t.Fatalf("side %s: %v, want a FailError for ErrPunchFailed and ErrTimeout", side, err)
		}
		if fe.Heard != 0 || fe.Answered != 0 || fe.Checks == 0 {
			t.Errorf("side %s: %+v: want checks sent and none heard or answered", side, fe)
		}
	}
}

// TestCancel: cancelling Run, or closing the attempt, stops it promptly even with a long
// timeout and a silent peer.
func TestCancel(t *testing.T) {
	for _, how := range []string{"cancel", "close"} {
		t.Run(how, func(t *testing.T) {
			_, a, b := pairWorld(t, 1, "pd-pd-rd", "ei-pd-pp", peerOpts{cfg: fast}, peerOpts{cfg: fast})
			step := nat.Strategy(a.profile, b.profile).Primary() // birthday, a hard
			session, key := newSession()
			at, _, err := a.eng.Prepare(context.Background(), punch.Setup{Session: session, Key: key, Step: step, Self: nat.SideA, Local: a.profile, Remote: b.profile, Main: a.main})
			if err != nil {
				t.Fatal(err)
			}
			defer at.Close()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() {
				_, err := at.Run(ctx, punch.Params{RemoteReflexive: []netip.AddrPort{b.refl}, Timeout: time.Minute})
				done <- err
			}()
			time.Sleep(50 * time.Millisecond)
			began := time.Now()
			want := context.Canceled
			if how == "cancel" {
				cancel()
			} else {
				at.Close()
				want = punch.ErrClosed
			}
			select {
			case err := <-done:
				if !errors.Is(err, want) || !errors.Is(err, punch.ErrPunchFailed) {
					t.Errorf("Run = %v, want %v", err, want)
				}
				if d := time.Since(began); d > time.Second {
					t.Errorf("Run took %v to stop", d)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Run did not stop")
			}
		})
	}
}

// TestRefused: relay steps and bad parameters are refused before anything is sent.
func TestRefused(t *testing.T) {
	_, a, b := pairWorld(t, 1, "pd-pd-rd", "hd-pd-rd", peerOpts{cfg: fast}, peerOpts{cfg: fast})
	plan := nat.Strategy(a.profile, b.profile)
	if plan.DirectCapable() {
		t.Fatalf("plan %v: want relay only", plan)
	}
	session, key := newSession()
	setup := punch.Setup{Session: session, Key: key, Step: plan.Primary(), Self: nat.SideA, Local: a.profile, Remote: b.profile, Main: a.main}
	ctx := context.Background()
	if _, _, err := a.eng.Prepare(ctx, setup); !errors.Is(err, punch.ErrNotPunchable) {
		t.Errorf("relay step: %v, want ErrNotPunchable", err)
	}
	for name, change := range map[string]func(*punch.Setup){
		"short key":  func(s *punch.Setup) { s.Key = key[:8] },
		"no session": func(s *punch.Setup) { s.Session = "" },
		"no socket":  func(s *punch.Setup) { s.Main = nil },
		"no side":    func(s *punch.Setup) { s.Self = nat.SideBoth },
	} {
		s := setup
		s.Step = nat.Step{Technique: nat.SimplePunch}
		change(&s)
		if _, _, err := a.eng.Prepare(ctx, s); !errors.Is(err, punch.ErrBadParams) {
			t.Errorf("%s: %v, want ErrBadParams", name, err)
		}
	}
	setup.Step = nat.Step{Technique: nat.SimplePunch}
	at, _, err := a.eng.Prepare(ctx, setup)
	if err != nil {
		t.Fatal(err)
	}
	defer at.Close()
	if _, _, err := a.eng.Prepare(ctx, setup); !errors.Is(err, punch.ErrBadParams) {
		t.Errorf("second attempt for one session: %v, want ErrBadParams", err)
	}
	if _, err := at.Run(ctx, punch.Params{}); !errors.Is(err, punch.ErrBadParams) {
		t.Errorf("Run without candidates: %v, want ErrBadParams", err)
	}
	p := punch.Params{RemoteReflexive: []netip.AddrPort{b.refl}, Timeout: 20 * time.Millisecond, MaxAttempts: 1}
	if _, err := at.Run(ctx, p); !errors.Is(err, punch.ErrPunchFailed) {
		t.Errorf("Run against a silent peer: %v", err)
	}
	if _, err := at.Run(ctx, p); !errors.Is(err, punch.ErrBadParams) {
		t.Errorf("second Run: %v, want ErrBadParams", err)
	}
}

// TestPacing checks the default pacing on the emulator in real time: birthday probes
// never run ahead of one per DefaultProbeInterval and stop at the cap, and checks to one
// destination are never closer than DefaultCheckInterval.
func TestPacing(t *testing.T) {
	if testing.Short() {
		t.Skip("real-time pacing test")
	}
	w, err := newWorld(1)
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	r := w.net.AddNAT(natlab.NATConfig{Name: "nat-a", Type: mustType(t, "ei-pd-pp"), PublicIP: natIPA})
	h := r.AddHost("a", hostIPA)
	conn, err := h.ListenPacket(context.Background(), "udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingConn{PacketConn: conn}
	eng := punch.New(punch.Config{Net: h, STUNServer: w.stun, BirthdayProbes: 40}) // default timing
	defer eng.Close()
	main := eng.NewMux(rec, mux.Config{})
	defer main.Close()
	local := nat.Profile{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP, PublicIP: natIPA}
	remote := nat.Profile{Mapping: nat.MappingPD, Filtering: nat.FilteringPD, Allocation: nat.AllocationRD, PublicIP: natIPB}
	silent := netip.AddrPortFrom(natIPB, 40000)

	run := func(step nat.Step, p punch.Params) {
		session, key := newSession()
		at, _, err := eng.Prepare(context.Background(), punch.Setup{Session: session, Key: key, Step: step, Self: nat.SideA, Local: local, Remote: remote, Main: main})
		if err != nil {
			t.Fatal(err)
		}
		defer at.Close()
		p.MaxAttempts = 1
		if _, err := at.Run(context.Background(), p); !errors.Is(err, punch.ErrTimeout) {
			t.Fatalf("Run against nobody: %v", err)
		}
	}

	// Birthday, easy side: the probes wait for the hard side's 8 sockets, then go out
	// at most one per interval on average, to distinct ports, up to the cap.
	run(nat.Step{Technique: nat.Birthday, Side: nat.SideB}, punch.Params{
		RemotePrediction: punch.Prediction{IP: natIPB, Sockets: 8}, Timeout: 400 * time.Millisecond,
	})
	probes := rec.packets()
	if len(probes) != 40 {
		t.Fatalf("%d probes, want the cap of 40", len(probes))
	}
	ports := map[uint16]bool{}
	for i, p := range probes {
		ports[p.dst.Port()] = true
		if ahead := time.Duration(i)*punch.DefaultProbeInterval - p.at.Sub(probes[0].at); ahead > time.Millisecond {
			t.Errorf("probe %d went out %v ahead of the pace", i, ahead)
		}
	}
	if len(ports) != len(probes) {
		t.Errorf("%d probes to %d distinct ports", len(probes), len(ports))
	}

	// Simple punching toward a silent peer: retransmissions to one destination.
	rec.mu.Lock()
	rec.sent = nil
	rec.mu.Unlock()
	run(nat.Step{Technique: nat.SimplePunch}, punch.Params{RemoteReflexive: []netip.AddrPort{silent}, Timeout: 400 * time.Millisecond})
	checks := rec.packets()
	if len(checks) < 3 {
		t.Fatalf("%d checks in 400 ms, want several retransmissions", len(checks))
	}
	for i := 1; i < len(checks); i++ {
		if gap := checks[i].at.Sub(checks[i-1].at); gap < punch.DefaultCheckInterval-time.Millisecond {
			t.Errorf("checks %d and %d to %v only %v apart", i-1, i, silent, gap)
		}
	}
}

// TestDetectedProfiles runs one pair per technique with profiles from real detection
// (RFC 5780 probing on the emulator), feeding the reflexive addresses the peers report
// into the detectors.
func TestDetectedProfiles(t *testing.T) {
	reps := representatives(t)
	for _, tech := range sortedTechniques(reps) {
		pair := reps[tech]
		t.Run(fmt.Sprintf("%s/%s-%s", tech, pair[0], pair[1]), func(t *testing.T) {
			t.Parallel()
			w, err := newWorld(3)
			if err != nil {
				t.Fatal(err)
			}
			defer w.close()
			ctx := context.Background()
			var peers [2]*peer
			var observed [2][]netip.AddrPort
			var mu sync.Mutex
			for i, name := range []string{"a", "b"} {
				natIP, hostIP := []netip.Addr{natIPA, natIPB}[i], []netip.Addr{hostIPA, hostIPB}[i]
				r := w.net.AddNAT(natlab.NATConfig{Name: "nat-" + name, Type: pair[i], PublicIP: natIP, Delta: 2})
				h := r.AddHost(name, hostIP)
				d := detect.New(detect.Config{
					Observers: []string{w.stun.String(), w.observer.String()},
					Net:       h,
					LocalIPs:  func() ([]netip.Addr, error) { return h.Addrs(), nil },
				})
				defer d.Close()
				prof, err := d.Detect(ctx, detect.Options{})
				if err != nil {
					t.Fatal(err)
				}
				if prof.Type() != pair[i] {
					t.Fatalf("%s detected as %s, configured %s", name, prof.Type(), pair[i])
				}
				cfg := fast
				cfg.Net, cfg.STUNServer = h, w.stun
				cfg.Observe = func(ap netip.AddrPort) {
					mu.Lock()
					observed[i] = append(observed[i], ap)
					mu.Unlock()
					d.AddObservation(ap)
				}
				p := &peer{name: name, nat: r, host: h, eng: punch.New(cfg), profile: prof}
				conn, err := h.ListenPacket(ctx, "udp4", ":0")
				if err != nil {
					t.Fatal(err)
				}
				p.main = p.eng.NewMux(conn, mux.Config{})
				defer func() { p.eng.Close(); p.main.Close() }()
				if p.refl, err = p.main.Binding(ctx, w.stun, 20*time.Millisecond); err != nil {
					t.Fatal(err)
				}
				p.hostAP = netip.AddrPortFrom(hostIP, p.main.LocalAddr().Port())
				peers[i] = p
			}
			plan := nat.Strategy(peers[0].profile, peers[1].profile)
			if plan.Primary().Technique != tech {
				t.Fatalf("plan from detected profiles %v, want %v", plan, tech)
			}
			out, err := runPair(ctx, peers[0], peers[1], plan.Primary(), runOpts{})
			if err != nil || !out.ok() {
				t.Fatalf("%v: %v %v", plan, err, out.err())
			}
			for i, ip := range []netip.Addr{natIPA, natIPB} {
				mu.Lock()
				obs := observed[i]
				mu.Unlock()
				if len(obs) != 1 || obs[0].Addr() != ip {
					t.Errorf("peer %d observed %v, want one address on %v", i, obs, ip)
				}
			}
		})
	}
}

func sortedTechniques(m map[nat.Technique][2]nat.Type) []nat.Technique {
	var ts []nat.Technique
	for t := range m {
		ts = append(ts, t)
	}
	slices.Sort(ts)
	return ts
}

// TestFakeClock: the engine's timing runs on the injected clock: nothing is sent before
// the agreed start, and a silent peer fails the attempt after exactly MaxAttempts
// timeouts of fake time, without waiting for them in real time.
func TestFakeClock(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	n := natlab.New(natlab.Config{Seed: 1, Clock: clk})
	defer n.Close()
	r := n.AddNAT(natlab.NATConfig{Name: "nat-a", Type: mustType(t, "ei-pd-pp"), PublicIP: natIPA})
	h := r.AddHost("a", hostIPA)
	conn, err := h.ListenPacket(context.Background(), "udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingConn{PacketConn: conn}
	eng := punch.New(punch.Config{Net: h, Clock: clk})
	defer eng.Close()
	main := eng.NewMux(rec, mux.Config{})
	defer main.Close()
	session, key := newSession()
	local := nat.Profile{Mapping: nat.MappingEI, Filtering: nat.FilteringPD, Allocation: nat.AllocationPP, PublicIP: natIPA}
	at, _, err := eng.Prepare(context.Background(), punch.Setup{Session: session, Key: key, Step: nat.Step{Technique: nat.SimplePunch}, Self: nat.SideA, Local: local, Main: main})
	if err != nil {
		t.Fatal(err)
	}
	defer at.Close()

	begin := clk.Now()
	start := begin.Add(3 * time.Second)
	type ended struct {
		at  time.Time
		err error
	}
	done := make(chan ended, 1)
	go func() {
		_, err := at.Run(context.Background(), punch.Params{
			RemoteReflexive: []netip.AddrPort{netip.AddrPortFrom(natIPB, 40000)},
			Start:           start, Timeout: 10 * time.Second, MaxAttempts: 2,
		})
		done <- ended{clk.Now(), err}
	}()
	realBegin := time.Now()
	for {
		select {
		case e := <-done:
			var fe *punch.FailError
			if !errors.As(e.err, &fe) || fe.Attempts != 2 || !errors.Is(e.err, punch.ErrTimeout) {
				t.Fatalf("Run = %v, want a timeout after 2 attempts", e.err)
			}
			if d := e.at.Sub(start); d < 20*time.Second || d > 25*time.Second {
				t.Errorf("Run failed %v after the start, want 20 s (2 × 10 s)", d)
			}
			if d := time.Since(realBegin); d > 10*time.Second {
				t.Errorf("took %v of real time", d)
			}
			sent := rec.packets()
			if len(sent) < 4 {
				t.Errorf("%d checks in 20 s of fake time", len(sent))
			}
			return
		default:
		}
		if clk.Now().Before(start) && len(rec.packets()) > 0 {
			t.Fatalf("a check went out at %v, before the start %v", clk.Now(), start)
		}
		clk.Advance(50 * time.Millisecond)
		time.Sleep(100 * time.Microsecond)
	}
}

// nominationBlocker drops a socket's answers to nominations until released: the
// responder's confirmations are lost while its attempt is open.
type nominationBlocker struct {
	net.PacketConn
	mu       sync.Mutex
	ids      map[[12]byte]bool
	released bool
	dropped  int
}

func (c *nominationBlocker) ReadFrom(b []byte) (int, net.Addr, error) {
	n, from, err := c.PacketConn.ReadFrom(b)
	if err == nil {
		var m pion.Message
		m.Raw = append([]byte(nil), b[:n]...)
		if m.Decode() == nil && m.Type == pion.BindingRequest && m.Contains(pion.AttrUseCandidate) {
			c.mu.Lock()
			c.ids[m.TransactionID] = true
			c.mu.Unlock()
		}
	}
	return n, from, err
}

func (c *nominationBlocker) WriteTo(b []byte, addr net.Addr) (int, error) {
	if len(b) >= 20 {
		var id [12]byte
		copy(id[:], b[8:20])
		c.mu.Lock()
		drop := !c.released && c.ids[id]
		if drop {
			c.dropped++
		}
		c.mu.Unlock()
		if drop {
			return len(b), nil
		}
	}
	return c.PacketConn.WriteTo(b, addr)
}

// TestResponderClosesAtOnce: a responder that closes its attempt as soon as Run returns
// still confirms the nominated path when the initiator repeats its nomination, because
// every confirmation sent before the close was lost.
func TestResponderClosesAtOnce(t *testing.T) {
	blocker := &nominationBlocker{ids: map[[12]byte]bool{}}
	ob := peerOpts{cfg: fast, wrap: func(c net.PacketConn) net.PacketConn { blocker.PacketConn = c; return blocker }}
	_, a, b := pairWorld(t, 1, "pd-hd-rd", "ei-pd-pp", peerOpts{cfg: fast}, ob)
	step := nat.Strategy(a.profile, b.profile).Primary()
	session, key := newSession()
	ctx := context.Background()
	atA, _, err := a.eng.Prepare(ctx, punch.Setup{Session: session, Key: key, Step: step, Self: nat.SideA, Local: a.profile, Remote: b.profile, Main: a.main})
	if err != nil {
		t.Fatal(err)
	}
	defer atA.Close()
	atB, _, err := b.eng.Prepare(ctx, punch.Setup{Session: session, Key: key, Step: step, Self: nat.SideB, Local: b.profile, Remote: a.profile, Main: b.main})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	resA := make(chan error, 1)
	go func() {
		_, err := atA.Run(ctx, punch.Params{RemoteHost: []netip.AddrPort{b.hostAP}, RemoteReflexive: []netip.AddrPort{b.refl}, Start: start})
		resA <- err
	}()
	rb, err := atB.Run(ctx, punch.Params{RemoteHost: []netip.AddrPort{a.hostAP}, RemoteReflexive: []netip.AddrPort{a.refl}, Start: start})
	atB.Close()
	blocker.mu.Lock()
	blocker.released = true
	dropped := blocker.dropped
	blocker.mu.Unlock()
	if err != nil {
		t.Fatalf("responder: %v", err)
	}
	if err := <-resA; err != nil {
		t.Fatalf("initiator, after the responder closed: %v", err)
	}
	if dropped == 0 {
		t.Error("no confirmation was dropped: the test did not test a lost one")
	}
	if rb.Local != b.main {
		t.Errorf("responder's path on %v, want the main socket", rb.Local.LocalAddr())
	}
}
