package faultlab

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"peerlink/connect"
	"peerlink/netlab"
)

// dropUDP makes the site's NAT router drop every UDP packet it forwards, both ways, or
// with on false lets them through again. It is the kernel-lab form of the outage
// session.TestUDPOutage makes in the emulator: the router itself, its NAT mappings and
// TCP (the rendezvous connection) stay up.
func dropUDP(ctx context.Context, s *netlab.Site, on bool) error {
	rules := "table ip faultlab_udp\ndelete table ip faultlab_udp\n"
	if on {
		rules += "table ip faultlab_udp {\n\tchain forward {\n\t\ttype filter hook forward priority filter - 30; policy accept;\n\t\tmeta l4proto udp drop\n\t}\n}\n"
	}
	cmd := s.Routers[0].Command(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft on %s: %v: %s", s.Name, err, out)
	}
	return nil
}

// TestUDPOutage drops all UDP on one NAT router of a punched pair and of a relayed pair
// for 10 s in the middle of their transfers. The sessions outlive it (their idle
// timeout is 30 s), both transfers complete intact, and data flows again within 15 s of
// the end of the outage (QUIC's backed-off probe timeout decides when).
func TestUDPOutage(t *testing.T) {
	t.Parallel()
	w := startWorld(t, true,
		netlab.SiteConfig{Name: "pr-1", Kind: netlab.KindPortRestricted}, netlab.SiteConfig{Name: "pr-2", Kind: netlab.KindPortRestricted},
		netlab.SiteConfig{Name: "sym-1", Kind: netlab.KindSymmetric}, netlab.SiteConfig{Name: "sym-2", Kind: netlab.KindSymmetric})
	n := w.nodes(t, "pr-1", "pr-2", "sym-1", "sym-2")
	pa, pb := pair(t, n["pr-1"], n["pr-2"], connect.MethodPunched)
	ra, rb := pair(t, n["sym-1"], n["sym-2"], connect.MethodRelayed)
	const outage = 10 * time.Second
	// 256 KiB/s for 12 s: the transfers span the outage (1 s before it, 10 s in it)
	// and what is left goes out at once when it ends.
	const rate = 256 << 10
	flows := []*flow{startFlow("punched", pa, pb, 12*rate, rate, 7), startFlow("relayed", ra, rb, 12*rate, rate, 8)}
	time.Sleep(time.Second)
	sites := []*netlab.Site{w.l.Site("pr-1"), w.l.Site("sym-1")}
	for _, s := range sites {
		if err := dropUDP(context.Background(), s, true); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dropUDP(context.Background(), s, false) })
	}
	cut := time.Now()
	time.Sleep(outage)
	for _, s := range sites {
		if err := dropUDP(context.Background(), s, false); err != nil {
			t.Fatal(err)
		}
	}
	healed := time.Now()
	var rows []Row
	for i, f := range flows {
		err := f.wait(60 * time.Second)
		resumed := Never
		if at, ok := f.meter.ResumedAfter(healed); ok {
			resumed = at.Sub(healed)
		}
		sess := []struct{ a, b *connect.Conn }{{pa.Conn(), pb.Conn()}, {ra.Conn(), rb.Conn()}}[i]
		st := sess.a.Stats()
		rows = append(rows, Row{Fault: "all UDP dropped 10 s", Survived: survived(f.name+" transfer", err == nil), Recovery: resumed,
			Note: fmt.Sprintf("after the outage; stall %v; method now %v (fallbacks %d, restores %d)", f.meter.MaxGap().Len().Round(time.Millisecond), sess.a.Method(), st.Fallbacks, st.Restores)})
		if err != nil {
			t.Errorf("%s transfer across the outage: %v", f.name, err)
		}
		if f.meter.Last().Before(cut.Add(outage)) {
			t.Errorf("%s: the transfer ended before the outage did: it did not cross it", f.name)
		}
		// QUIC's probe timeout doubles through the outage, so its next probe may come
		// several seconds after the path is back.
		if resumed < 0 || resumed > 15*time.Second {
			t.Errorf("%s: data flowed again %v after the outage, want within 15 s", f.name, resumed)
		}
	}
	t.Logf("\n%s", Table(rows))
}
